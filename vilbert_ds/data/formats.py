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
Every reader yields one item per handle: a `FeatureRecord`, or a `BadRecord` naming the file and
row (TSV), the file and key (LMDB) or the file (npz) with the reason. A bad record never ends the
stream, so the builder decides (fail, or skip it and keep every later record).

Captions:
- `{image_id: caption}` JSON (the original `caption_train.json`), or
- the Conceptual Captions TSV `caption<TAB>url`; the image id of a row is
  `crc32(url) & 0xffffffff` in decimal, as in the original CC feature-extraction/LMDB scripts.
"""
from __future__ import annotations

import base64
import binascii
import glob
import hashlib
import json
import os
import pickle
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .sample import FeatureRecord

TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features", "cls_prob")


class InputError(ValueError):
    """An input record that cannot be parsed; names the file and the record."""


@dataclass(frozen=True)
class BadRecord:
    """A record that could not be read. `message` starts with where it is: `file:row` (TSV),
    `file key K` (LMDB) or the file (npz)."""

    message: str

    def __str__(self) -> str:
        return self.message


LMDB_EXTRA_HINT = "pip install -e '.[lmdb]'"


def _require_modules(kind: str, modules: Sequence[str]) -> None:
    """The LMDB formats need the `lmdb` extra; say so in one line instead of a ModuleNotFoundError."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise InputError(f"--format {kind} needs the Python module {name!r}, which is not installed: "
                             f"{LMDB_EXTRA_HINT} (or pip install lmdb msgpack msgpack-numpy)") from None


def _parse_guarded(where: str, parse: Callable[[], FeatureRecord]) -> FeatureRecord | BadRecord:
    """parse() -> the record (with `source` = where), or a BadRecord. The bytes of one record are
    untrusted input: whatever parsing them raises (numpy, msgpack, pickle, int()) is that record's
    fault, so it becomes a BadRecord naming `where` instead of ending the build."""
    try:
        record = parse()
    except InputError as e:
        return BadRecord(str(e))
    except Exception as e:  # noqa: BLE001 - see the docstring; I/O happens outside parse()
        return BadRecord(f"{where}: {type(e).__name__}: {e}")
    record.source = where
    return record


def file_identity(paths: Sequence[str]) -> dict[str, Any]:
    """What a build records about its input files: how many, their total size, and a digest of
    (absolute path, size, modification time in ns) of each. Costs one stat per file and reads no
    data, so checking it on every rerun is cheap even for terabytes of TSV or millions of npz
    files; a rewritten, replaced, truncated or touched file changes it."""
    sha = hashlib.sha256()
    total = 0
    for p in paths:
        st = os.stat(p)
        total += st.st_size
        sha.update(f"{os.path.abspath(p)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return {"files": len(paths), "bytes": total, "digest": sha.hexdigest()}


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
        if not os.path.isfile(path):
            raise InputError(f"{path}: captions file not found" if not os.path.exists(path)
                             else f"{path}: captions path is not a file")
        try:
            if path.endswith(".json"):
                return cls._load_json(path)
            return cls._load_tsv(path)
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: captions file is not UTF-8 text (byte {e.start}: {e.reason})") from None
        except OSError as e:
            raise InputError(f"{path}: cannot read the captions file ({e.strerror or e})") from None

    @classmethod
    def _load_json(cls, path: str) -> "Captions":
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{e.lineno}: captions JSON is malformed ({e.msg}); expected "
                                 f"{{image_id: caption}}") from None
        if not isinstance(d, dict):
            raise InputError(f"{path}: expected a JSON object {{image_id: caption}}, got {type(d).__name__}")
        for k, v in d.items():
            if not isinstance(v, str):
                raise InputError(f"{path}: caption of image {k!r} is a {type(v).__name__}, expected a string")
        by_id = {str(k): v for k, v in d.items()}
        return cls(by_id=by_id, pool=list(by_id.values()), source=path)

    @classmethod
    def _load_tsv(cls, path: str) -> "Captions":
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
        if not pool:
            raise InputError(f"{path}: no captions in the file (expected 'caption<TAB>url' lines or a .json "
                             f"{{image_id: caption}})")
        return cls(by_id=by_id, pool=pool, source=path)

    def identity(self) -> dict[str, Any]:
        return {"path": os.path.abspath(self.source), **file_identity([self.source])}


# ---------------------------------------------------------------------------------------------
# feature inputs


class FeatureInput:
    """Base of the input formats: `index()` in the main process, `read(handles)` in workers."""

    kind = ""
    paths: list[str]

    def index(self) -> list[Any]:
        raise NotImplementedError

    def read(self, handles: Sequence[Any]) -> Iterator[FeatureRecord | BadRecord]:
        """One item per handle, in order: the record, or a BadRecord naming where it is."""
        raise NotImplementedError

    def files(self) -> list[str]:
        """The files whose content the records come from (for the build identity)."""
        return list(self.paths)

    def identity(self) -> dict[str, Any]:
        """What a shard records about its input (see `file_identity`)."""
        return {"format": self.kind, "paths": list(self.paths), **file_identity(self.files())}


def _b64_array(field: str, dtype, shape: tuple[int, ...], where: str, name: str) -> np.ndarray:
    try:
        raw = base64.b64decode(field, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{where}: column {name} is not base64 ({e})") from None
    itemsize = np.dtype(dtype).itemsize
    expected = int(np.prod(shape))
    if len(raw) != expected * itemsize:
        raise InputError(f"{where}: column {name} has {len(raw)} bytes = {len(raw) / itemsize:g} float32 values, "
                         f"expected {list(shape)} = {expected}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


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
                raise InputError(f"{p}: TSV file not found" if not os.path.exists(p) else f"{p}: not a file")

    def index(self) -> list[tuple[int, int, int, int]]:
        """(file index, row, line start, line end) of every non-empty line, in file order; rows
        are 1-based line numbers (for messages)."""
        handles: list[tuple[int, int, int, int]] = []
        for fi, path in enumerate(self.paths):
            start = 0
            pos = 0
            row = 1
            with open(path, "rb") as f:
                while True:
                    block = f.read(self._SCAN_BLOCK)
                    if not block:
                        break
                    nl = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
                    for off in nl.tolist():
                        end = pos + off
                        if end > start:
                            handles.append((fi, row, start, end))
                        start = end + 1
                        row += 1
                    pos += len(block)
            if pos > start:
                handles.append((fi, row, start, pos))
        return handles

    def read(self, handles):
        files: dict[int, Any] = {}
        try:
            for fi, row, start, end in handles:
                f = files.get(fi)
                if f is None:
                    f = files[fi] = open(self.paths[fi], "rb")
                f.seek(start)
                raw = f.read(end - start)
                where = f"{self.paths[fi]}:{row}"
                yield _parse_guarded(where, lambda: self.parse(raw.decode("utf-8").rstrip("\r"), where))
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
        except (ValueError, OverflowError):
            raise InputError(f"{where}: image_w/image_h/num_boxes are not numbers: {cols[1:4]!r}") from None
        if n < 0:
            raise InputError(f"{where}: num_boxes {n} is negative")
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
    try:
        return lmdb.open(path, subdir=subdir, readonly=True, lock=False, readahead=False, meminit=False, max_readers=126)
    except lmdb.Error as e:
        raise InputError(f"{path}: not a readable LMDB ({type(e).__name__}: {e})") from None


def _lmdb_files(paths: Sequence[str]) -> list[str]:
    """The data files of LMDBs: `data.mdb` inside a directory LMDB, else the file itself."""
    return [os.path.join(p, "data.mdb") if os.path.isdir(p) else p for p in paths]


def _lmdb_values(paths: Sequence[str], handles, key_list: str, encoding: str):
    """Yields (where, raw value or None) for (path index, key) handles, each LMDB opened once and
    closed at the end; None: a key that the file's key list names but the file lacks."""
    envs: dict[int, Any] = {}
    try:
        for pi, key in handles:
            env = envs.get(pi)
            if env is None:
                env = envs[pi] = _lmdb_open(paths[pi])
            where = f"{paths[pi]} key {key.decode(encoding, 'replace')}"
            try:
                with env.begin() as txn:
                    raw = txn.get(key)
            except Exception as e:  # noqa: BLE001 - lmdb.Error subclasses (corrupt page, bad map): the file is damaged
                raise InputError(f"{where}: the LMDB cannot be read ({type(e).__name__}: {e})") from None
            yield where, (None if raw is None else bytes(raw))
    finally:
        for env in envs.values():
            env.close()


def _absent(where: str, key_list: str) -> BadRecord:
    return BadRecord(f"{where}: listed in {key_list} but absent from the LMDB")


def _lmdb_keys(path: str, key_list: bytes, loads: Callable[[bytes], Any]) -> list[bytes]:
    """The record keys of one LMDB: its key list entry when present, else every other key."""
    env = _lmdb_open(path)
    try:
        with env.begin() as txn:
            raw = txn.get(key_list)
            if raw is None:  # no key list: every key except the list itself, in LMDB (sorted) order
                return [bytes(k) for k, _ in txn.cursor() if k != key_list]
            try:
                keys = loads(bytes(raw))
                return [k if isinstance(k, bytes) else str(k).encode() for k in keys]
            except Exception as e:  # noqa: BLE001 - a corrupt key list: any decoder error
                raise InputError(f"{path} key {key_list.decode()}: the key list cannot be decoded "
                                 f"({type(e).__name__}: {e})") from None
    finally:
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
            raw = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InputError(f"{where}: {name} is neither an array nor base64 float32 ({e})") from None
        if len(raw) % 4:
            raise InputError(f"{where}: {name} is base64 of {len(raw)} bytes, not a whole number of float32")
        v = np.frombuffer(raw, dtype=np.float32)
    arr = np.asarray(v)
    if arr.dtype.hasobject or arr.dtype.kind not in "biuf" or arr.size % cols:
        raise InputError(f"{where}: {name} has shape {arr.shape} / dtype {arr.dtype}, expected [N, {cols}] numbers")
    return arr.reshape(-1, cols).astype(dtype, copy=False)


class CcLmdbInput(FeatureInput):
    """The original CC pretraining LMDB(s) (tensorpack LMDBSerializer, msgpack lists)."""

    kind = "cc-lmdb"

    def __init__(self, paths: Sequence[str], feature_dim: int = 2048, num_classes: int = 1601):
        _require_modules(self.kind, ("lmdb", "msgpack", "msgpack_numpy"))
        self.paths = [os.path.abspath(p) for p in paths]
        self.feature_dim, self.num_classes = feature_dim, num_classes
        for p in self.paths:
            if not os.path.exists(p):
                raise InputError(f"{p}: LMDB not found")

    def files(self):
        return _lmdb_files(self.paths)

    def index(self):
        handles = []
        for pi, path in enumerate(self.paths):
            handles.extend((pi, k) for k in _lmdb_keys(path, b"__keys__", _msgpack_loads))
        return handles

    def read(self, handles):
        for where, raw in _lmdb_values(self.paths, handles, "__keys__", "ascii"):
            yield _absent(where, "__keys__") if raw is None else _parse_guarded(
                where, lambda: self.parse(_msgpack_loads(raw), where))

    def parse(self, dp, where: str) -> FeatureRecord:
        if not isinstance(dp, (list, tuple)) or len(dp) != 8:
            raise InputError(f"{where}: expected the list [features, cls_prob, boxes, num_boxes, image_h, image_w, "
                             f"image_id, caption], got {type(dp).__name__} of length {len(dp) if hasattr(dp, '__len__') else '?'}")
        features, cls_prob, boxes, num_boxes, image_h, image_w, image_id, caption = dp
        where = f"{where} (image_id {_to_str(image_id)})"
        feats = _array(features, np.float32, self.feature_dim, where, "features")
        try:
            n = int(_to_str(num_boxes))
            image_w, image_h = int(float(_to_str(image_w))), int(float(_to_str(image_h)))
        except (ValueError, OverflowError):
            raise InputError(f"{where}: num_boxes/image_h/image_w are not numbers: "
                             f"{[num_boxes, image_h, image_w]!r}") from None
        if feats.shape[0] != n:
            raise InputError(f"{where}: num_boxes {n} but features have {feats.shape[0]} rows")
        return FeatureRecord(image_id=_to_str(image_id), image_w=image_w, image_h=image_h,
                             boxes=_array(boxes, np.float32, 4, where, "boxes"), features=feats,
                             cls_prob=_array(cls_prob, np.float32, self.num_classes, where, "cls_prob"),
                             caption=_to_str(caption))


class PickleLmdbInput(FeatureInput):
    """The original downstream feature LMDBs (pickled dicts). Pickle can run code when loaded:
    this reader refuses to start unless `trust_pickle=True`."""

    kind = "lmdb-pickle"

    def __init__(self, paths: Sequence[str], feature_dim: int = 2048, num_classes: int = 1601, trust_pickle: bool = False):
        if not trust_pickle:
            raise InputError(f"{', '.join(paths)}: LMDB values are Python pickles, and unpickling a file can run "
                             f"arbitrary code; pass --trust-pickle (trust_pickle=True) only for files you trust")
        _require_modules(self.kind, ("lmdb",))
        self.paths = [os.path.abspath(p) for p in paths]
        self.feature_dim, self.num_classes = feature_dim, num_classes
        for p in self.paths:
            if not os.path.exists(p):
                raise InputError(f"{p}: LMDB not found")

    def files(self):
        return _lmdb_files(self.paths)

    def index(self):
        handles = []
        for pi, path in enumerate(self.paths):
            handles.extend((pi, k) for k in _lmdb_keys(path, b"keys", pickle.loads))
        return handles

    def read(self, handles):
        for where, raw in _lmdb_values(self.paths, handles, "'keys'", "utf-8"):
            yield _absent(where, "'keys'") if raw is None else _parse_guarded(where, lambda: self.parse(raw, where))

    def parse(self, raw: bytes, where: str) -> FeatureRecord:
        item = pickle.loads(raw)
        if not isinstance(item, dict):
            raise InputError(f"{where}: expected a dict, got {type(item).__name__}")
        missing = [k for k in ("image_id", "image_w", "image_h", "boxes", "features") if k not in item]
        if missing:
            raise InputError(f"{where}: dict lacks the key(s) {', '.join(missing)}")
        where = f"{where} (image_id {_to_str(item['image_id'])})"
        cls_prob = item.get("cls_prob")
        return FeatureRecord(
            image_id=_to_str(item["image_id"]), image_w=int(item["image_w"]), image_h=int(item["image_h"]),
            boxes=_array(item["boxes"], np.float32, 4, where, "boxes"),
            features=_array(item["features"], np.float32, self.feature_dim, where, "features"),
            cls_prob=None if cls_prob is None else _array(cls_prob, np.float32, self.num_classes, where, "cls_prob"))


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
        self._files = [os.path.abspath(f) for f in files]
        self.paths = [os.path.abspath(p) for p in paths]
        self.feature_dim, self.num_classes = feature_dim, num_classes

    def files(self):
        return list(self._files)

    def index(self):
        return list(self._files)

    def read(self, handles):
        for path in handles:
            yield _parse_guarded(path, lambda: self.parse(path))

    def parse(self, path: str) -> FeatureRecord:
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001 - zipfile/numpy raise many types for a damaged file
            raise InputError(f"{path}: not a readable .npz without pickles ({type(e).__name__}: {e})") from None

        def get(name):
            for alias in _NPZ_ALIASES[name]:
                if alias in d:
                    return d[alias]
            raise InputError(f"{path}: no array named {' or '.join(_NPZ_ALIASES[name])}")

        def scalar(name) -> int:
            v = np.asarray(get(name))
            if v.size != 1 or v.dtype.kind not in "iuf":
                raise InputError(f"{path}: {name} is {v.dtype}{list(v.shape)}, expected one number")
            return int(v.item())

        image_id = _to_str(d["image_id"].item()) if "image_id" in d else os.path.splitext(os.path.basename(path))[0]
        where = f"{path} (image_id {image_id})"
        cls_prob = d.get("cls_prob")
        return FeatureRecord(
            image_id=image_id, image_w=scalar("image_w"), image_h=scalar("image_h"),
            boxes=_array(get("boxes"), np.float32, 4, where, "boxes"),
            features=_array(get("features"), np.float32, self.feature_dim, where, "features"),
            cls_prob=None if cls_prob is None else _array(cls_prob, np.float32, self.num_classes, where, "cls_prob"))


FORMATS = {"tsv": TsvInput, "cc-lmdb": CcLmdbInput, "lmdb-pickle": PickleLmdbInput, "npz": NpzDirInput}


def open_input(kind: str, paths: Sequence[str], **kwargs) -> FeatureInput:
    if kind not in FORMATS:
        raise InputError(f"unknown input format {kind!r}; choose one of {', '.join(FORMATS)}")
    if kind != "lmdb-pickle":
        kwargs.pop("trust_pickle", None)
    return FORMATS[kind](paths, **kwargs)
