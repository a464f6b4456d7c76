"""The original's released files (its `datasets.tar.gz`), read safely.

The original 12-in-1 code ships, per task directory (`dataroot` in its `vilbert_tasks.yml`:
`VQA/`, `gqa/`, `visual_genome/`, `cocoRetreival/`, `flickr30k/`, `refcoco/`, ...):
- `cache/trainval_ans2label.pkl` ({answer: label}) and `cache/trainval_label2ans.pkl` ([answer])
  for VQA, GQA and Visual Genome QA: the answer order its classifier heads were trained with;
- `hard_negative.pkl` / `hard_negative_cleaned.pkl` (retrieval): {"train_image_list": [image id],
  "train_hard_pool": float64 array [images, 100] of indices into that list, nearest first,
  column 0 being the image itself} mined offline from region features;
- `cache/coco_test_ids.npy`, `cache/flickr_test_ids.npy`, `cache/genome_test_ids.npy`: the image
  ids that `--clean_train_sets` removes from training splits;
- the `refer` toolkit's `refs(unc).p` / `refs(umd).p` pickles (RefCOCO*).

A pickle can run any code while it loads (a `__reduce__` naming a function). Every pickle here
goes through ONE restricted unpickler, `load_plain_pickle`, that refuses every class or function
reference: only dicts, lists, tuples, sets, strings, bytes, numbers, booleans and None load,
plus (only where the real file holds one, `arrays=True`: the hard-negative pool) numeric numpy
arrays, rebuilt by numpy's own array reconstructor and nothing else. A refused or unreadable
file is a one-line `ReleasedFileError` naming the file. `.npy` files are read with
`allow_pickle=False`.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Any, Callable

import numpy as np

# image domain (tasks.yaml `image_domain`) -> the original's id list of its test images
TEST_ID_FILES = {"coco": "coco_test_ids.npy", "flickr30k": "flickr_test_ids.npy", "vg": "genome_test_ids.npy"}
ANS2LABEL = "cache/trainval_ans2label.pkl"
LABEL2ANS = "cache/trainval_label2ans.pkl"


class ReleasedFileError(ValueError):
    """A released file that is refused (it would construct objects) or cannot be read."""


class UnsafePickleError(ReleasedFileError, pickle.UnpicklingError):
    """The pickle refers to a class or function that is not allowed: refused before anything
    was constructed from it."""


def _numeric_dtype(dtype: np.dtype, where: str) -> np.dtype:
    if dtype.hasobject:
        raise UnsafePickleError(f"{where}: holds a numpy array of Python objects; only numeric arrays are accepted")
    return dtype


def _array_globals(where: str) -> dict[tuple[str, str], Callable[..., Any]]:
    """The numpy names an array pickle refers to, each wrapped to build numeric arrays only."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray

    def reconstruct(subtype, shape, dtype_code):
        if subtype is not np.ndarray:
            raise UnsafePickleError(f"{where}: an array of type {subtype!r}; only numpy.ndarray is accepted")
        return multiarray._reconstruct(np.ndarray, shape, dtype_code)

    def dtype(spec, align=False, copy=False):
        return _numeric_dtype(np.dtype(spec, align, copy), where)

    def scalar(dt, data):
        return multiarray.scalar(_numeric_dtype(dt, where), data)

    def frombuffer(buffer, dt, shape, order):
        return np.frombuffer(buffer, dtype=_numeric_dtype(np.dtype(dt), where)).reshape(shape, order=order).copy()

    out: dict[tuple[str, str], Callable[..., Any]] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): dtype}
    for core in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x write different module names
        out[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        out[(f"{core}.multiarray", "scalar")] = scalar
        out[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return out


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a bytes literal")
    return text.encode("latin1")


class _PlainUnpickler(pickle.Unpickler):
    """Refuses every GLOBAL / STACK_GLOBAL / INST / EXT reference (all go through find_class),
    which is the only way a pickle constructs an object or calls a function; with `arrays`, only
    the wrapped numpy array reconstructors of `_array_globals` are resolved."""

    def __init__(self, file, where: str, arrays: bool):
        super().__init__(file, encoding="latin1")  # Python 2 `str` -> text (repaired below) and numpy buffers
        self.where = where
        # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1")
        self.allowed = {("_codecs", "encode"): _latin1_bytes, **(_array_globals(where) if arrays else {})}
        self.arrays = arrays

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name))
        if found is None:
            raise UnsafePickleError(
                f"{self.where}: refers to {module}.{name}; only plain lists, dicts, strings and numbers"
                f"{' and numeric numpy arrays' if self.arrays else ''} are accepted from released files "
                f"(refusing to construct objects)"
            )
        return found


def _fix_text(value: Any) -> Any:
    """Python 2 byte strings holding UTF-8 arrive as latin-1 mojibake; repair them."""
    if isinstance(value, str):
        try:
            return value.encode("latin1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [_fix_text(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_fix_text(v) for v in value)
    if isinstance(value, dict):
        return {_fix_text(k): _fix_text(v) for k, v in value.items()}
    return value


def _check_plain(value: Any, where: str) -> None:
    """Nothing but plain containers, text, numbers and numeric arrays (a second line of defence:
    the unpickler cannot build anything else)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if v is None or isinstance(v, (str, bytes, bytearray, bool, int, float, complex)):
            continue
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            stack.extend(v)
        elif isinstance(v, (np.ndarray, np.generic)):
            _numeric_dtype(v.dtype, where)
        else:
            raise UnsafePickleError(f"{where}: holds a {type(v).__name__}; only plain data is accepted")


def read_released_bytes(path: str | os.PathLike) -> bytes:
    """A local path or fsspec URL, read whole."""
    import fsspec

    try:
        with fsspec.open(os.fspath(path), "rb").open() as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"file {path} does not exist") from None


def released_source(*files: str) -> dict[str, Any]:
    """An asset source naming released files and their sha256, so changed files rebuild the assets."""
    import hashlib

    return {"kind": "released", "files": list(files),
            "sha256": [hashlib.sha256(read_released_bytes(f)).hexdigest()[:16] for f in files]}


def load_plain_pickle(path: str | os.PathLike, *, arrays: bool = False) -> Any:
    """A pickle of plain data (any protocol, Python 2 or 3) from a local path or fsspec URL.

    `arrays=True` also accepts numeric numpy arrays (the hard-negative pool). Python 2 pickles
    (protocol <= 2) get their UTF-8 byte strings repaired into text."""
    where = os.fspath(path)
    data = read_released_bytes(path)
    try:
        value = _PlainUnpickler(io.BytesIO(data), where, arrays).load()
    except UnsafePickleError as exc:
        message = str(exc)
        raise UnsafePickleError(message if message.startswith(where) else f"{where}: {message}") from None
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt pickles raise UnpicklingError, EOFError, ...
        raise ReleasedFileError(f"{where}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    _check_plain(value, where)
    python2 = not data.startswith(b"\x80") or data[1] <= 2
    return _fix_text(value) if python2 else value


def load_id_list(path: str | os.PathLike) -> list[str]:
    """Image ids from a `.npy` (the original's `*_test_ids.npy`, read with allow_pickle=False) or
    a JSON list; returned as strings (the task shards compare image ids as strings)."""
    where = os.fspath(path)
    data = read_released_bytes(path)
    if where.endswith(".npy"):
        try:
            ids = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as exc:  # object arrays need pickle: refused
            raise ReleasedFileError(f"{where}: not a plain numeric/text .npy array ({exc})") from None
        if ids.dtype.kind == "f":
            if not np.all(np.isfinite(ids)) or not np.all(ids == np.round(ids)):
                raise ReleasedFileError(f"{where}: image ids must be whole numbers")
            ids = ids.astype(np.int64)
        return [str(i) for i in ids.reshape(-1).tolist()]
    import json

    try:
        ids = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ReleasedFileError(f"{where}: invalid JSON ({exc})") from None
    if not isinstance(ids, list):
        raise ReleasedFileError(f"{where}: expected a JSON list of image ids, got {type(ids).__name__}")
    return [str(i) for i in ids]


def load_label_map(directory: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The answers of a classifier head in label order, from the original's
    `cache/trainval_label2ans.pkl`, checked against `cache/trainval_ans2label.pkl`.
    Returns (answers, the two file paths)."""
    root = os.fspath(directory).rstrip("/")
    a2l_path, l2a_path = f"{root}/{ANS2LABEL}", f"{root}/{LABEL2ANS}"
    ans2label = load_plain_pickle(a2l_path)
    label2ans = load_plain_pickle(l2a_path)
    if not isinstance(ans2label, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                                  for k, v in ans2label.items()):
        raise ReleasedFileError(f"{a2l_path}: expected a dict {{answer: label}} of strings to integers")
    if not isinstance(label2ans, list) or not all(isinstance(a, str) for a in label2ans):
        raise ReleasedFileError(f"{l2a_path}: expected a list of answers (strings)")
    if not label2ans:
        raise ReleasedFileError(f"{l2a_path}: no answers")
    if len(set(label2ans)) != len(label2ans):
        raise ReleasedFileError(f"{l2a_path}: an answer occurs twice")
    wrong = [a for a, i in ans2label.items() if not 0 <= i < len(label2ans) or label2ans[i] != a]
    if wrong or len(ans2label) != len(label2ans):
        raise ReleasedFileError(f"{a2l_path} and {l2a_path} disagree ({len(ans2label)} vs {len(label2ans)} answers; "
                                f"first mismatches {wrong[:3]})")
    return list(label2ans), [a2l_path, l2a_path]


def load_hard_negative_pool(path: str | os.PathLike) -> dict[str, list[str]]:
    """The original's `hard_negative*.pkl` -> {image id: [similar image ids, nearest first]}
    (column 0, the image itself, dropped as the original never draws it)."""
    where = os.fspath(path)
    data = load_plain_pickle(path, arrays=True)
    if not isinstance(data, dict) or "train_image_list" not in data or "train_hard_pool" not in data:
        raise ReleasedFileError(f"{where}: expected a dict with 'train_image_list' and 'train_hard_pool'")
    images = [str(int(i)) if isinstance(i, (int, np.integer)) else str(i) for i in data["train_image_list"]]
    pool = np.asarray(data["train_hard_pool"])
    if pool.ndim != 2 or pool.shape[0] != len(images) or pool.shape[1] < 2:
        raise ReleasedFileError(f"{where}: train_hard_pool {pool.shape} does not match {len(images)} images x (>= 2)")
    index = pool.astype(np.int64)
    if not np.all(index == pool) or index.min() < 0 or index.max() >= len(images):
        raise ReleasedFileError(f"{where}: train_hard_pool holds entries that are not indices into train_image_list")
    return {img: [images[j] for j in row[1:] if images[j] != img] for img, row in zip(images, index.tolist())}
