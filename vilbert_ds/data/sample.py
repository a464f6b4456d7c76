"""One shard sample: the in-memory record, its tar members, and their validation.

Layout of a sample with key K (docs/DESIGN.md section 3):

| member | content |
|---|---|
| `K.json` | `{"image_id", "caption", "image_w", "image_h", "num_boxes", ...}` (UTF-8, sorted keys) |
| `K.features.npy` | float16 `[N, D]` region features (D = 2048; N = num_boxes, no global region) |
| `K.boxes.npy` | float32 `[N, 4]` absolute x1 y1 x2 y2 in pixels |
| `K.cls_prob.npy` | float16 `[N, 1601]` detector class distribution (only when the input has it) |

A set built with a compact encoding (data/encoding.py, recorded in its manifest) carries 8-bit
features and/or top-k cls_prob members instead; `decode` turns them back into the float16 arrays
above, so nothing after it knows the difference.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .encoding import (CLS_PROB_TOPK_CLASSES, CLS_PROB_TOPK_VALUES, ENCODED_MEMBERS, FEATURES_E4M3, FEATURES_INT8,
                       FEATURES_SCALE, Encoding, decode_cls_prob, decode_features, quantize_features, topk_cls_prob)

FEATURES = "features.npy"
BOXES = "boxes.npy"
CLS_PROB = "cls_prob.npy"
META = "json"
MEMBER_ORDER = (META, FEATURES, BOXES, CLS_PROB)  # members are written in this order
# members `decode` consumes; any other member is passed on undecoded in `Sample.extra`
DECODED_MEMBERS = frozenset(MEMBER_ORDER + ENCODED_MEMBERS)


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


def encode(record: FeatureRecord, key: str, feature_dim: int = 2048,
           encoding: Encoding = Encoding()) -> list[tuple[str, bytes]]:
    """The tar members of a record: META, the features (float16, or 8-bit codes + scales), BOXES,
    the cls_prob (float16, or top-k values + classes). Validates shapes first."""
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
    if encoding.features == "float16":
        members.append((FEATURES, npy_bytes(feats)))
    else:
        members += [(ext, npy_bytes(arr)) for ext, arr in quantize_features(record.features, encoding.features)]
    members.append((BOXES, npy_bytes(record.boxes.astype(np.float32))))
    if record.cls_prob is not None:
        if encoding.cls_prob_topk is None:
            members.append((CLS_PROB, npy_bytes(record.cls_prob.astype(np.float16))))
        else:
            if not np.isfinite(record.cls_prob).all() or (record.cls_prob < 0).any():
                raise SampleError(f"{where}: cls_prob has NaN/Inf or negative values (top-k needs probabilities)")
            members += [(ext, npy_bytes(arr)) for ext, arr in topk_cls_prob(record.cls_prob, encoding.cls_prob_topk)]
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
    """Decodes and validates one sample; `where` names shard and key in errors. Compact members
    (8-bit features, top-k cls_prob) are decoded into the float16 arrays; top-k needs
    `num_classes` (the manifest's)."""
    has_features = FEATURES in members or FEATURES_INT8 in members or FEATURES_E4M3 in members
    missing = [m for m in (META, FEATURES, BOXES) if m not in members and (m != FEATURES or not has_features)]
    if missing:
        raise SampleError(f"{where}: missing member(s) {', '.join(missing)} (has {', '.join(sorted(members)) or 'none'})")
    try:
        meta = json.loads(bytes(members[META]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError(f"{where}: {META} member is not valid JSON ({e})") from None
    if FEATURES in members:
        feats = npy_array(members[FEATURES], f"{where}.{FEATURES}")
    else:
        feats = _features(members, where, feature_dim)
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
    elif CLS_PROB_TOPK_VALUES in members or CLS_PROB_TOPK_CLASSES in members:
        cls_prob = _topk_cls_prob(members, where, feats.shape[0], num_classes)
    if check_finite:
        for name, arr in ((FEATURES, feats), (BOXES, boxes), (CLS_PROB, cls_prob)):
            if arr is not None and not all_finite(arr):
                raise SampleError(f"{where}: {name} contains NaN/Inf")
    extra = {ext: data for ext, data in members.items() if ext not in DECODED_MEMBERS}
    return Sample(key=key, meta=meta, features=feats, boxes=boxes, cls_prob=cls_prob, extra=extra)


def _features(members: dict[str, bytes], where: str, feature_dim: int) -> np.ndarray:
    """float16 `[N, D]` from 8-bit codes `[N, D]` (int8, or uint8 e4m3 bits) and float16 scales `[N]`."""
    ext, dtype = (FEATURES_INT8, np.int8) if FEATURES_INT8 in members else (FEATURES_E4M3, np.uint8)
    if FEATURES_SCALE not in members:
        raise SampleError(f"{where}: {ext} without its {FEATURES_SCALE} member")
    codes = npy_array(members[ext], f"{where}.{ext}")
    scale = npy_array(members[FEATURES_SCALE], f"{where}.{FEATURES_SCALE}")
    if codes.dtype != dtype or codes.ndim != 2 or codes.shape[1] != feature_dim:
        raise SampleError(f"{where}: {ext} {codes.dtype}{list(codes.shape)}, expected "
                          f"{np.dtype(dtype)}[N, {feature_dim}]")
    if scale.dtype != np.float16 or scale.shape != (codes.shape[0],):
        raise SampleError(f"{where}: {FEATURES_SCALE} {scale.dtype}{list(scale.shape)}, expected "
                          f"float16[{codes.shape[0]}]")
    if not all_finite(scale) or (scale < 0).any():
        raise SampleError(f"{where}: {FEATURES_SCALE} has NaN/Inf or negative values")
    if dtype == np.uint8 and ((codes & 0x7F) == 0x7F).any():  # e4m3fn's only non-finite codes
        raise SampleError(f"{where}: {ext} holds NaN codes (0x7f/0xff)")
    return decode_features({ext: codes, FEATURES_SCALE: scale})


def _topk_cls_prob(members: dict[str, bytes], where: str, n: int, num_classes: int | None) -> np.ndarray:
    """float16 `[N, C]` from top-k values (float16 `[N, k]`) and classes (uint16 `[N, k]`)."""
    for ext in (CLS_PROB_TOPK_VALUES, CLS_PROB_TOPK_CLASSES):
        if ext not in members:
            raise SampleError(f"{where}: top-k cls_prob without its {ext} member")
    if num_classes is None:
        raise SampleError(f"{where}: top-k cls_prob needs the shard set's num_classes (its manifest's) to decode")
    values = npy_array(members[CLS_PROB_TOPK_VALUES], f"{where}.{CLS_PROB_TOPK_VALUES}")
    classes = npy_array(members[CLS_PROB_TOPK_CLASSES], f"{where}.{CLS_PROB_TOPK_CLASSES}")
    if values.dtype != np.float16 or values.ndim != 2 or values.shape[0] != n or values.shape[1] > num_classes:
        raise SampleError(f"{where}: {CLS_PROB_TOPK_VALUES} {values.dtype}{list(values.shape)}, expected float16[{n}, k] "
                          f"with k <= {num_classes}")
    if classes.dtype != np.uint16 or classes.shape != values.shape:
        raise SampleError(f"{where}: {CLS_PROB_TOPK_CLASSES} {classes.dtype}{list(classes.shape)}, expected "
                          f"uint16{list(values.shape)}")
    if not all_finite(values) or (values < 0).any():
        raise SampleError(f"{where}: {CLS_PROB_TOPK_VALUES} has NaN/Inf or negative values")
    if classes.size and int(classes.max()) >= num_classes:
        raise SampleError(f"{where}: {CLS_PROB_TOPK_CLASSES} holds class {int(classes.max())}, beyond the set's "
                          f"{num_classes} classes")
    ordered = np.sort(classes, axis=1)
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise SampleError(f"{where}: {CLS_PROB_TOPK_CLASSES} repeats a class within a region")
    return decode_cls_prob(values, classes, num_classes)
