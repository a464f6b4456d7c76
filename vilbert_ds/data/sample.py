"""One shard sample: the in-memory record, its tar members, and their validation.

Layout of a sample with key K (docs/DESIGN.md section 3):

| member | content |
|---|---|
| `K.json` | `{"image_id", "caption", "image_w", "image_h", "num_boxes", ...}` (UTF-8, sorted keys) |
| `K.features.npy` | float16 `[N, D]` region features (D = 2048; N = num_boxes, no global region) |
| `K.boxes.npy` | float32 `[N, 4]` absolute x1 y1 x2 y2 in pixels |
| `K.cls_prob.npy` | float16 `[N, 1601]` detector class distribution (only when the input has it) |
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FEATURES = "features.npy"
BOXES = "boxes.npy"
CLS_PROB = "cls_prob.npy"
META = "json"
MEMBER_ORDER = (META, FEATURES, BOXES, CLS_PROB)  # members are written in this order


class SampleError(ValueError):
    """A sample that is missing members, has wrong shapes/dtypes or non-finite values."""


@dataclass
class FeatureRecord:
    """One image's detections (+ caption) as read from any input format, before encoding.

    features `[N, D]` (any float dtype; stored as float16), boxes `[N, 4]` absolute x1 y1 x2 y2,
    cls_prob `[N, C]` or None.
    """

    image_id: str
    image_w: int
    image_h: int
    boxes: np.ndarray
    features: np.ndarray
    cls_prob: np.ndarray | None = None
    caption: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able metadata kept in K.json
    source: str = ""  # where the record was read (`file:row`, `file key K`, a file); not stored

    @property
    def num_boxes(self) -> int:
        return int(self.features.shape[0])


def key_for(image_id: str, suffix: str | None = None) -> str:
    """A WebDataset sample key for an image id: no dots or slashes (they split key and ext)."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", str(image_id))
    return f"{key}_{suffix}" if suffix is not None else key


def npy_bytes(array: np.ndarray) -> bytes:
    """A .npy file (format 1.0) of `array`; deterministic for equal arrays."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


_HEADER_CACHE: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}  # npy header bytes -> parsed


def _npy_header(data, where: str) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran, payload offset) of .npy bytes. Headers repeat (same shapes), so
    parsed headers are cached: numpy's own parser (ast.literal_eval) costs ~70 us a member."""
    head = bytes(data[:10])
    if len(head) < 10 or head[:6] != b"\x93NUMPY":
        raise SampleError(f"{where}: not a .npy member (bad magic {head[:6]!r})")
    major = head[6]
    if major == 1:
        hlen, start = int.from_bytes(head[8:10], "little"), 10
    elif major in (2, 3):
        hlen, start = int.from_bytes(bytes(data[8:12]), "little"), 12
    else:
        raise SampleError(f"{where}: unsupported .npy version {major}")
    header = bytes(data[start:start + hlen])
    parsed = _HEADER_CACHE.get(header)
    if parsed is None:
        try:
            buf = io.BytesIO(bytes(data[:start + hlen]))
            version = np.lib.format.read_magic(buf)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(buf)
        except Exception as e:  # noqa: BLE001 - numpy raises ValueError/OSError variants on bad headers
            raise SampleError(f"{where}: not a valid .npy member ({e})") from None
        if dtype.hasobject:
            raise SampleError(f"{where}: .npy with object dtype refused (could run code)")
        parsed = (dtype, tuple(shape), bool(fortran))
        if len(_HEADER_CACHE) < 256:
            _HEADER_CACHE[header] = parsed
    return parsed[0], parsed[1], parsed[2], start + hlen


def npy_array(data, where: str) -> np.ndarray:
    """Decodes .npy bytes (bytes, bytearray or memoryview) without copying the payload."""
    dtype, shape, fortran, offset = _npy_header(data, where)
    count = 1
    for d in shape:
        count *= d
    if len(data) - offset < count * dtype.itemsize:
        raise SampleError(f"{where}: .npy payload truncated ({len(data) - offset} of {count * dtype.itemsize} bytes)")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape, order="F" if fortran else "C")


def all_finite(arr: np.ndarray) -> bool:
    """No NaN/Inf. float16: no element with all exponent bits set (a bit test on the uint16
    view, ~15x faster than numpy's float16 isfinite)."""
    if arr.size == 0:
        return True
    if arr.dtype == np.float16:
        bits = np.ascontiguousarray(arr).view(np.uint16)
        return int((bits & 0x7FFF).max()) < 0x7C00  # |x| bits below the Inf/NaN exponent
    return bool(np.isfinite(arr).all())


def encode(record: FeatureRecord, key: str, feature_dim: int = 2048) -> list[tuple[str, bytes]]:
    """The tar members of a record, in MEMBER_ORDER. Validates shapes first."""
    n = record.num_boxes
    where = f"{record.source} (image_id {record.image_id})" if record.source else f"image {record.image_id}"
    if n == 0:
        raise SampleError(f"{where}: num_boxes 0: an image needs at least one region (the global region is "
                          f"their mean)")
    if record.features.ndim != 2 or record.features.shape[1] != feature_dim:
        raise SampleError(f"{where}: features shape {record.features.shape}, expected [N, {feature_dim}]")
    if record.boxes.shape != (n, 4):
        raise SampleError(f"{where}: boxes shape {record.boxes.shape}, expected [{n}, 4]")
    if record.cls_prob is not None and (record.cls_prob.ndim != 2 or record.cls_prob.shape[0] != n):
        raise SampleError(f"{where}: cls_prob shape {record.cls_prob.shape}, expected [{n}, C]")
    if not (record.image_w > 0 and record.image_h > 0):
        raise SampleError(f"{where}: image size {record.image_w}x{record.image_h} must be positive")
    meta = dict(record.extra)
    meta.update(image_id=str(record.image_id), image_w=int(record.image_w), image_h=int(record.image_h), num_boxes=n)
    if record.caption is not None:
        meta["caption"] = record.caption
    members = [(META, json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))]
    feats = record.features.astype(np.float16)
    if not all_finite(feats):
        raise SampleError(f"{where}: features have NaN/Inf (or values beyond float16 range, |x| > 65504)")
    members.append((FEATURES, npy_bytes(feats)))
    members.append((BOXES, npy_bytes(record.boxes.astype(np.float32))))
    if record.cls_prob is not None:
        members.append((CLS_PROB, npy_bytes(record.cls_prob.astype(np.float16))))
    return members


@dataclass
class Sample:
    """A decoded shard sample (arrays are read-only views into the tar bytes)."""

    key: str
    meta: dict[str, Any]
    features: np.ndarray  # [N, D] float16
    boxes: np.ndarray  # [N, 4] float32
    cls_prob: np.ndarray | None  # [N, C] float16
    shard: str = ""
    # members beyond META/FEATURES/BOXES/CLS_PROB, undecoded (ext -> bytes): task shards carry
    # `task.json` and second-image / GT-box members here (docs/TASKS.md)
    extra: dict[str, bytes] = field(default_factory=dict)

    @property
    def caption(self) -> str | None:
        return self.meta.get("caption")


def decode(key: str, members: dict[str, bytes], where: str, *, feature_dim: int = 2048,
           num_classes: int | None = None, check_finite: bool = True) -> Sample:
    """Decodes and validates one sample; `where` names shard and key in errors."""
    missing = [m for m in (META, FEATURES, BOXES) if m not in members]
    if missing:
        raise SampleError(f"{where}: missing member(s) {', '.join(missing)} (has {', '.join(sorted(members)) or 'none'})")
    try:
        meta = json.loads(bytes(members[META]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError(f"{where}: {META} member is not valid JSON ({e})") from None
    feats = npy_array(members[FEATURES], f"{where}.{FEATURES}")
    boxes = npy_array(members[BOXES], f"{where}.{BOXES}")
    n = meta.get("num_boxes")
    if feats.dtype != np.float16 or feats.ndim != 2 or feats.shape[1] != feature_dim:
        raise SampleError(f"{where}: features {feats.dtype}{list(feats.shape)}, expected float16[N, {feature_dim}]")
    if n != feats.shape[0]:
        raise SampleError(f"{where}: json num_boxes={n} but features have {feats.shape[0]} rows")
    if boxes.dtype != np.float32 or boxes.shape != (feats.shape[0], 4):
        raise SampleError(f"{where}: boxes {boxes.dtype}{list(boxes.shape)}, expected float32[{feats.shape[0]}, 4]")
    cls_prob = None
    if CLS_PROB in members:
        cls_prob = npy_array(members[CLS_PROB], f"{where}.{CLS_PROB}")
        if cls_prob.dtype != np.float16 or cls_prob.ndim != 2 or cls_prob.shape[0] != feats.shape[0] or (
                num_classes is not None and cls_prob.shape[1] != num_classes):
            raise SampleError(f"{where}: cls_prob {cls_prob.dtype}{list(cls_prob.shape)}, expected "
                              f"float16[{feats.shape[0]}, {num_classes or 'C'}]")
    if check_finite:
        for name, arr in ((FEATURES, feats), (BOXES, boxes), (CLS_PROB, cls_prob)):
            if arr is not None and not all_finite(arr):
                raise SampleError(f"{where}: {name} contains NaN/Inf")
    extra = {ext: data for ext, data in members.items() if ext not in MEMBER_ORDER}
    return Sample(key=key, meta=meta, features=feats, boxes=boxes, cls_prob=cls_prob, extra=extra)
