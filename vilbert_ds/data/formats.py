"""Readers for the public region-feature formats and caption files.

Each input is indexed first (a deterministic list of small, picklable handles), then read by
handle in the build workers, so shard k always holds the same records whatever the worker count.

Feature inputs:
- `tsv`: bottom-up-attention TSV, no header, tab-separated columns
  `image_id, image_w, image_h, num_boxes, boxes, features[, cls_prob]`, arrays as base64 of
  float32 (C order): boxes `[N, 4]`, features `[N, 2048]`, cls_prob `[N, 1601]`.
Captions:
- `{image_id: caption}` JSON (the original `caption_train.json`), or
- the Conceptual Captions TSV `caption<TAB>url`; the image id of a row is
  `crc32(url) & 0xffffffff` in decimal, as in the original CC feature-extraction/LMDB scripts.
"""
from __future__ import annotations

import base64
import json
import os
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from .sample import FeatureRecord

TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features", "cls_prob")


class InputError(ValueError):
    """An input record that cannot be parsed; names the file and the record."""


def cc_image_id(url: str) -> str:
    """Image id of a Conceptual Captions row: crc32 of the URL, unsigned, decimal."""
    return str(zlib.crc32(url.encode("utf-8")) & 0xFFFFFFFF)


# ---------------------------------------------------------------------------------------------
# captions


@dataclass
class Captions:
    """image id -> caption, plus the ordered caption list used as the pool of negatives."""

    by_id: dict[str, str]
    pool: list[str]
    source: str

    def get(self, image_id: str) -> str | None:
        return self.by_id.get(str(image_id))

    @classmethod
    def load(cls, path: str) -> "Captions":
        """A `{image_id: caption}` JSON or a CC `caption<TAB>url` TSV (by extension/content)."""
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            if not isinstance(d, dict):
                raise InputError(f"{path}: expected a JSON object {{image_id: caption}}, got {type(d).__name__}")
            by_id = {str(k): str(v) for k, v in d.items()}
            return cls(by_id=by_id, pool=list(by_id.values()), source=path)
        by_id: dict[str, str] = {}
        pool: list[str] = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line:
                    continue
                parts = line.split("\t")
                if len(parts) < 2:
                    raise InputError(f"{path}:{lineno}: expected 'caption<TAB>url', got {line[:80]!r}")
                caption, url = parts[0], parts[1]
                by_id[cc_image_id(url)] = caption
                pool.append(caption)
        return cls(by_id=by_id, pool=pool, source=path)


# ---------------------------------------------------------------------------------------------
# feature inputs


class FeatureInput:
    """Base of the input formats: `index()` in the main process, `read(handles)` in workers."""

    kind = ""

    def index(self) -> list[Any]:
        raise NotImplementedError

    def read(self, handles: Sequence[Any]) -> Iterator[FeatureRecord]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"format": self.kind}


def _b64_array(field: str, dtype, shape: tuple[int, ...], where: str, name: str) -> np.ndarray:
    try:
        raw = base64.b64decode(field, validate=False)
    except (ValueError, TypeError) as e:
        raise InputError(f"{where}: column {name} is not base64 ({e})") from None
    arr = np.frombuffer(raw, dtype=dtype)
    if arr.size != int(np.prod(shape)):
        raise InputError(f"{where}: column {name} has {arr.size} values, expected {list(shape)} = {int(np.prod(shape))}")
    return arr.reshape(shape)


class TsvInput(FeatureInput):
    """Bottom-up-attention TSV files (several files are read in the order given)."""

    kind = "tsv"
    _SCAN_BLOCK = 64 << 20  # bytes per read while indexing line starts

    def __init__(self, paths: Sequence[str], feature_dim: int = 2048, num_classes: int = 1601):
        self.paths = [os.path.abspath(p) for p in paths]
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        for p in self.paths:
            if not os.path.isfile(p):
                raise InputError(f"{p}: TSV file not found")

    def describe(self):
        return {"format": self.kind, "paths": self.paths}

    def index(self) -> list[tuple[int, int, int]]:
        """(file index, line start, line end) of every non-empty line, in file order."""
        handles: list[tuple[int, int, int]] = []
        for fi, path in enumerate(self.paths):
            start = 0
            pos = 0
            with open(path, "rb") as f:
                while True:
                    block = f.read(self._SCAN_BLOCK)
                    if not block:
                        break
                    nl = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
                    for off in nl.tolist():
                        end = pos + off
                        if end > start:
                            handles.append((fi, start, end))
                        start = end + 1
                    pos += len(block)
            if pos > start:
                handles.append((fi, start, pos))
        return handles

    def read(self, handles):
        files: dict[int, Any] = {}
        try:
            for fi, start, end in handles:
                f = files.get(fi)
                if f is None:
                    f = files[fi] = open(self.paths[fi], "rb")
                f.seek(start)
                line = f.read(end - start).decode("ascii", "replace").rstrip("\r")
                yield self.parse(line, f"{self.paths[fi]} @byte {start}")
        finally:
            for f in files.values():
                f.close()

    def parse(self, line: str, where: str) -> FeatureRecord:
        cols = line.split("\t")
        if len(cols) not in (6, 7):
            raise InputError(f"{where}: {len(cols)} tab-separated columns, expected 6 or 7 ({', '.join(TSV_FIELDS)})")
        image_id = cols[0]
        where = f"{where} (image_id {image_id})"
        try:
            image_w, image_h, n = int(float(cols[1])), int(float(cols[2])), int(cols[3])
        except ValueError:
            raise InputError(f"{where}: image_w/image_h/num_boxes are not numbers: {cols[1:4]!r}") from None
        boxes = _b64_array(cols[4], np.float32, (n, 4), where, "boxes")
        features = _b64_array(cols[5], np.float32, (n, self.feature_dim), where, "features")
        cls_prob = None
        if len(cols) == 7 and cols[6]:
            cls_prob = _b64_array(cols[6], np.float32, (n, self.num_classes), where, "cls_prob")
        return FeatureRecord(image_id=image_id, image_w=image_w, image_h=image_h, boxes=boxes,
                             features=features, cls_prob=cls_prob)


def write_tsv_row(f, record: FeatureRecord, with_cls_prob: bool = True) -> None:
    """Appends one record to a bottom-up-attention TSV (base64 float32 columns)."""
    cols = [str(record.image_id), str(int(record.image_w)), str(int(record.image_h)), str(record.num_boxes),
            base64.b64encode(np.ascontiguousarray(record.boxes, dtype=np.float32).tobytes()).decode(),
            base64.b64encode(np.ascontiguousarray(record.features, dtype=np.float32).tobytes()).decode()]
    if with_cls_prob and record.cls_prob is not None:
        cols.append(base64.b64encode(np.ascontiguousarray(record.cls_prob, dtype=np.float32).tobytes()).decode())
    f.write(("\t".join(cols) + "\n").encode("ascii"))


FORMATS = {"tsv": TsvInput}


def open_input(kind: str, paths: Sequence[str], **kwargs) -> FeatureInput:
    if kind not in FORMATS:
        raise InputError(f"unknown input format {kind!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[kind](paths, **kwargs)
