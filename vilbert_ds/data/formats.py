"""Readers for the public region-feature formats and caption files.

Each input is indexed first (a deterministic list of small, picklable handles), then read by
handle in the build workers, so shard k always holds the same records whatever the worker count.

Feature inputs:
- `tsv`: bottom-up-attention TSV, no header, tab-separated columns
  `image_id, image_w, image_h, num_boxes, boxes, features[, cls_prob]`, arrays as base64 of
  float32 (C order): boxes `[N, 4]`, features `[N, 2048]`, cls_prob `[N, 1601]`.
- `cc-lmdb`: the original Conceptual Captions LMDB written by tensorpack's `LMDBSerializer`
  (`training_feat_all.lmdb`, or the per-rank `training_feat_part_{r}.lmdb`): keys `%08d`, values
  msgpack (+msgpack_numpy) lists `[features, cls_prob, boxes, num_boxes, image_h, image_w,
  image_id, caption]`, plus `__keys__` (the key list). The caption is in the datapoint. An LMDB
  path that is a directory holds `data.mdb`; otherwise it is the data file itself.
- `lmdb-pickle`: the original downstream feature LMDBs (`script/convert_to_lmdb.py`): values are
  pickled dicts `{image_id, image_h, image_w, num_boxes, boxes, features}` keyed by
  `str(image_id)`, plus `keys`. Unpickling can run code: refused unless `trust_pickle=True`
  (CLI `--trust-pickle`).
- `npz`: a directory of per-image `.npz` files (sorted by name) with arrays `features` (or `x`),
  `boxes` (or `bbox`), `image_w`/`image_h` (or `image_width`/`image_height`), optional
  `cls_prob`, `image_id` (default: the file name without extension). Loaded without pickle.
Captions:
- `{image_id: caption}` JSON (the original `caption_train.json`), or
- the Conceptual Captions TSV `caption<TAB>url`; the image id of a row is
  `crc32(url) & 0xffffffff` in decimal, as in the original CC feature-extraction/LMDB scripts.
"""
from __future__ import annotations

import base64
import glob
import json
import os
import pickle
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


# ---------------------------------------------------------------------------------------------
# LMDB inputs


def _lmdb_open(path: str, write: bool = False, map_size: int = 1 << 30):
    import lmdb

    subdir = os.path.isdir(path)
    if write:
        return lmdb.open(path, subdir=subdir, map_size=map_size, meminit=False)
    if not os.path.exists(path):
        raise InputError(f"{path}: LMDB not found")
    return lmdb.open(path, subdir=subdir, readonly=True, lock=False, readahead=False, meminit=False, max_readers=126)


def _lmdb_values(paths: Sequence[str], handles, key_list: str, encoding: str):
    """Yields (where, raw value) for (path index, key) handles, each LMDB opened once and closed
    at the end; a key that the file's key list names but the file lacks is an InputError."""
    envs: dict[int, Any] = {}
    try:
        for pi, key in handles:
            env = envs.get(pi)
            if env is None:
                env = envs[pi] = _lmdb_open(paths[pi])
            where = f"{paths[pi]} key {key.decode(encoding, 'replace')}"
            with env.begin() as txn:
                raw = txn.get(key)
            if raw is None:
                raise InputError(f"{where}: listed in {key_list} but absent")
            yield where, raw
    finally:
        for env in envs.values():
            env.close()


def _msgpack_loads(buf: bytes):
    import msgpack
    import msgpack_numpy

    big = 1 << 31
    return msgpack.loads(buf, raw=False, object_hook=msgpack_numpy.decode, max_bin_len=big, max_array_len=big,
                         max_map_len=big, max_str_len=big)


def msgpack_dumps(obj) -> bytes:
    """tensorpack's `dumps` for LMDBSerializer (msgpack with msgpack_numpy arrays)."""
    import msgpack
    import msgpack_numpy

    return msgpack.dumps(obj, use_bin_type=True, default=msgpack_numpy.encode)


def _to_str(v) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)


def _array(v, dtype, cols: int, where: str, name: str) -> np.ndarray:
    """ndarray, or base64 text/bytes of float32 (older files), reshaped to [-1, cols]."""
    if isinstance(v, (str, bytes, bytearray)):
        try:
            v = np.frombuffer(base64.b64decode(v), dtype=np.float32)
        except (ValueError, TypeError) as e:
            raise InputError(f"{where}: {name} is neither an array nor base64 float32 ({e})") from None
    arr = np.asarray(v)
    if arr.dtype.hasobject or arr.size % cols:
        raise InputError(f"{where}: {name} has shape {arr.shape} / dtype {arr.dtype}, expected [N, {cols}] numbers")
    return arr.reshape(-1, cols).astype(dtype, copy=False)


class CcLmdbInput(FeatureInput):
    """The original CC pretraining LMDB(s) (tensorpack LMDBSerializer, msgpack lists)."""

    kind = "cc-lmdb"

    def __init__(self, paths: Sequence[str], feature_dim: int = 2048, num_classes: int = 1601):
        self.paths = [os.path.abspath(p) for p in paths]
        self.feature_dim, self.num_classes = feature_dim, num_classes

    def describe(self):
        return {"format": self.kind, "paths": self.paths}

    def index(self):
        handles = []
        for pi, path in enumerate(self.paths):
            env = _lmdb_open(path)
            with env.begin() as txn:
                raw = txn.get(b"__keys__")
                if raw is not None:
                    keys = [bytes(k) if not isinstance(k, str) else k.encode() for k in _msgpack_loads(raw)]
                else:  # no key list: every key except the list itself, in LMDB (sorted) order
                    keys = [k for k, _ in txn.cursor() if k != b"__keys__"]
            env.close()
            handles.extend((pi, k) for k in keys)
        return handles

    def read(self, handles):
        for where, raw in _lmdb_values(self.paths, handles, "__keys__", "ascii"):
            yield self.parse(_msgpack_loads(raw), where)

    def parse(self, dp, where: str) -> FeatureRecord:
        if not isinstance(dp, (list, tuple)) or len(dp) != 8:
            raise InputError(f"{where}: expected the list [features, cls_prob, boxes, num_boxes, image_h, image_w, "
                             f"image_id, caption], got {type(dp).__name__} of length {len(dp) if hasattr(dp, '__len__') else '?'}")
        features, cls_prob, boxes, num_boxes, image_h, image_w, image_id, caption = dp
        where = f"{where} (image_id {_to_str(image_id)})"
        feats = _array(features, np.float32, self.feature_dim, where, "features")
        n = int(_to_str(num_boxes))
        if feats.shape[0] != n:
            raise InputError(f"{where}: num_boxes {n} but features have {feats.shape[0]} rows")
        return FeatureRecord(image_id=_to_str(image_id), image_w=int(float(_to_str(image_w))),
                             image_h=int(float(_to_str(image_h))), boxes=_array(boxes, np.float32, 4, where, "boxes"),
                             features=feats, cls_prob=_array(cls_prob, np.float32, self.num_classes, where, "cls_prob"),
                             caption=_to_str(caption))


class PickleLmdbInput(FeatureInput):
    """The original downstream feature LMDBs (pickled dicts). Pickle can run code when loaded:
    this reader refuses to start unless `trust_pickle=True`."""

    kind = "lmdb-pickle"

    def __init__(self, paths: Sequence[str], feature_dim: int = 2048, num_classes: int = 1601, trust_pickle: bool = False):
        if not trust_pickle:
            raise InputError(f"{', '.join(paths)}: LMDB values are Python pickles, and unpickling a file can run "
                             f"arbitrary code; pass --trust-pickle (trust_pickle=True) only for files you trust")
        self.paths = [os.path.abspath(p) for p in paths]
        self.feature_dim, self.num_classes = feature_dim, num_classes

    def describe(self):
        return {"format": self.kind, "paths": self.paths}

    def index(self):
        handles = []
        for pi, path in enumerate(self.paths):
            env = _lmdb_open(path)
            with env.begin() as txn:
                raw = txn.get(b"keys")
                keys = pickle.loads(raw) if raw is not None else [k for k, _ in txn.cursor() if k != b"keys"]
            env.close()
            handles.extend((pi, k if isinstance(k, bytes) else str(k).encode()) for k in keys)
        return handles

    def read(self, handles):
        for where, raw in _lmdb_values(self.paths, handles, "'keys'", "utf-8"):
            item = pickle.loads(raw)
            if not isinstance(item, dict):
                raise InputError(f"{where}: expected a dict, got {type(item).__name__}")
            try:
                feats = _array(item["features"], np.float32, self.feature_dim, where, "features")
                boxes = _array(item["boxes"], np.float32, 4, where, "boxes")
                cls_prob = item.get("cls_prob")
                yield FeatureRecord(
                    image_id=_to_str(item["image_id"]), image_w=int(item["image_w"]), image_h=int(item["image_h"]),
                    boxes=boxes, features=feats,
                    cls_prob=None if cls_prob is None else _array(cls_prob, np.float32, self.num_classes, where, "cls_prob"))
            except KeyError as e:
                raise InputError(f"{where}: dict lacks the key {e}") from None


# ---------------------------------------------------------------------------------------------
# per-image npz files

_NPZ_ALIASES = {
    "features": ("features", "x"),
    "boxes": ("boxes", "bbox"),
    "image_w": ("image_w", "image_width", "w"),
    "image_h": ("image_h", "image_height", "h"),
}


class NpzDirInput(FeatureInput):
    kind = "npz"

    def __init__(self, paths: Sequence[str], feature_dim: int = 2048, num_classes: int = 1601):
        files: list[str] = []
        for p in paths:
            if os.path.isdir(p):
                files.extend(sorted(glob.glob(os.path.join(p, "*.npz"))))
            elif os.path.isfile(p):
                files.append(p)
            else:
                raise InputError(f"{p}: not a directory or .npz file")
        self.files = [os.path.abspath(f) for f in files]
        self.paths = [os.path.abspath(p) for p in paths]
        self.feature_dim, self.num_classes = feature_dim, num_classes

    def describe(self):
        return {"format": self.kind, "paths": self.paths}

    def index(self):
        return list(self.files)

    def read(self, handles):
        for path in handles:
            try:
                with np.load(path, allow_pickle=False) as z:
                    d = {k: z[k] for k in z.files}
            except (OSError, ValueError) as e:
                raise InputError(f"{path}: not a readable .npz without pickles ({e})") from None

            def get(name):
                for alias in _NPZ_ALIASES[name]:
                    if alias in d:
                        return d[alias]
                raise InputError(f"{path}: no array named {' or '.join(_NPZ_ALIASES[name])}")

            image_id = _to_str(d["image_id"].item()) if "image_id" in d else os.path.splitext(os.path.basename(path))[0]
            cls_prob = d.get("cls_prob")
            yield FeatureRecord(
                image_id=image_id, image_w=int(get("image_w")), image_h=int(get("image_h")),
                boxes=_array(get("boxes"), np.float32, 4, path, "boxes"),
                features=_array(get("features"), np.float32, self.feature_dim, path, "features"),
                cls_prob=None if cls_prob is None else _array(cls_prob, np.float32, self.num_classes, path, "cls_prob"))


FORMATS = {"tsv": TsvInput, "cc-lmdb": CcLmdbInput, "lmdb-pickle": PickleLmdbInput, "npz": NpzDirInput}


def open_input(kind: str, paths: Sequence[str], **kwargs) -> FeatureInput:
    if kind not in FORMATS:
        raise InputError(f"unknown input format {kind!r}; choose one of {', '.join(FORMATS)}")
    if kind != "lmdb-pickle":
        kwargs.pop("trust_pickle", None)
    return FORMATS[kind](paths, **kwargs)
