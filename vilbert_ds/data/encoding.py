"""Compact sample encodings: fewer bytes per sample, decoded back into today's arrays.

A shard set is built with one `Encoding` (recorded in its manifest and shard stats); every
sample of it then carries these members instead of the float16 ones (docs/DESIGN.md section 3):

| encoding | members | bytes at 36 regions | decoded into |
|---|---|---|---|
| features `float16` (default) | `K.features.npy` float16 `[N, D]` | 147 KB | itself |
| features `int8` | `K.features_int8.npy` int8 `[N, D]` + `K.features_scale.npy` float16 `[N]` | 74 KB | float16 `[N, D]` = q * scale |
| features `e4m3` | `K.features_e4m3.npy` uint8 `[N, D]` (float8 e4m3fn bits) + `K.features_scale.npy` | 74 KB | float16 `[N, D]` = e4m3(q) * scale |
| cls_prob `float16` (default) | `K.cls_prob.npy` float16 `[N, C]` | 115 KB | itself |
| cls_prob `topk:K` | `K.cls_prob_topk_values.npy` float16 `[N, K]` + `K.cls_prob_topk_classes.npy` uint16 `[N, K]` | 2 x N*K*2 B | float16 `[N, C]`: the kept values scattered into zeros and renormalised to sum 1 |

Error bounds (per region r with absmax a_r = max |x| over its D values):
- int8: symmetric, scale s_r = float16(a_r / 127), q = round(x / s_r); |x - x'| <= s_r / 2 plus the
  float16 rounding of s_r and of x' (2^-11 relative each): at most a_r / 254 + a_r / 1024. For
  a_r < 127 * 2^-14 (~0.008) s_r is a float16 subnormal and only the absolute error stays that
  small (an all-zero region decodes to zeros).
- e4m3: scale s_r = float16(a_r / 448) (448 is e4m3's largest finite value), 3 mantissa bits:
  |x - x'| <= |x| / 16 for |x| >= 2^-6 s_r, else <= 2^-10 s_r (subnormals), plus float16 rounding.
- topk:K: the decoded target q is p restricted to its K largest classes and renormalised; with M
  the kept mass, KL(q || p) = -log M and the total variation distance is 1 - M (the loss's
  gradient w.r.t. the logits, softmax - target, moves by at most 2(1 - M) in L1).

Encoding e4m3 rounds through torch's float8_e4m3fn (round to nearest even); decoding reads the
codes through a 256-entry table (checked against torch in the tests).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

FEATURES_INT8 = "features_int8.npy"
FEATURES_E4M3 = "features_e4m3.npy"
FEATURES_SCALE = "features_scale.npy"
CLS_PROB_TOPK_VALUES = "cls_prob_topk_values.npy"
CLS_PROB_TOPK_CLASSES = "cls_prob_topk_classes.npy"
ENCODED_MEMBERS = (FEATURES_INT8, FEATURES_E4M3, FEATURES_SCALE, CLS_PROB_TOPK_VALUES, CLS_PROB_TOPK_CLASSES)

FEATURE_ENCODINGS = ("float16", "int8", "e4m3")
INT8_MAX = 127
E4M3_MAX = 448.0  # largest finite float8 e4m3fn value
MAX_TOPK = 1 << 16  # class indices are uint16


class EncodingError(ValueError):
    """An encoding name the code does not know (one line, naming the accepted ones)."""


@dataclass(frozen=True)
class Encoding:
    """How a shard set stores features and cls_prob. `cls_prob_topk` None keeps all classes."""

    features: str = "float16"
    cls_prob_topk: int | None = None

    def __post_init__(self):
        if self.features not in FEATURE_ENCODINGS:
            raise EncodingError(f"unknown feature encoding {self.features!r}; expected one of "
                                f"{', '.join(FEATURE_ENCODINGS)}")
        if self.cls_prob_topk is not None and not 1 <= self.cls_prob_topk < MAX_TOPK:
            raise EncodingError(f"cls_prob top-k must be in [1, {MAX_TOPK - 1}], got {self.cls_prob_topk}")

    @classmethod
    def parse(cls, features: str = "float16", cls_prob: str = "float16") -> "Encoding":
        """From the build options' spelling: features `float16|int8|e4m3`, cls_prob `float16|topk:K`."""
        if cls_prob == "float16":
            return cls(features=features)
        m = re.fullmatch(r"topk:(\d+)", cls_prob)
        if m is None:
            raise EncodingError(f"unknown cls_prob encoding {cls_prob!r}; expected float16 or topk:K (e.g. topk:16)")
        return cls(features=features, cls_prob_topk=int(m.group(1)))

    @property
    def cls_prob(self) -> str:
        return "float16" if self.cls_prob_topk is None else f"topk:{self.cls_prob_topk}"

    @property
    def is_default(self) -> bool:
        return self == Encoding()

    def to_json(self) -> dict[str, Any]:
        return dict(features=self.features, cls_prob=self.cls_prob)

    @classmethod
    def from_json(cls, d: Any) -> "Encoding":
        """A manifest's `encoding` field; absent (older manifests) means float16 throughout."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise EncodingError(f"encoding must be an object like "
                                f"{{\"features\": \"int8\", \"cls_prob\": \"topk:16\"}}, got {d!r}")
        return cls.parse(str(d.get("features", "float16")), str(d.get("cls_prob", "float16")))

    def __str__(self) -> str:
        return f"features {self.features}, cls_prob {self.cls_prob}"


# -- features --------------------------------------------------------------------------------------
def _region_scale(features: np.ndarray, top: float) -> np.ndarray:
    """float16 [N] per-region scale absmax / top; the float16 rounding is applied here so that the
    encoder divides by exactly the scale the decoder multiplies by."""
    absmax = np.abs(features).max(axis=1) if features.size else np.zeros(features.shape[0], np.float32)
    return (absmax / top).astype(np.float16)


def _safe_div(features: np.ndarray, scale: np.ndarray) -> np.ndarray:
    s = scale.astype(np.float32)[:, None]
    return np.divide(features, s, out=np.zeros_like(features), where=s > 0)  # an all-zero region stays zero


def quantize_features(features: np.ndarray, encoding: str) -> list[tuple[str, np.ndarray]]:
    """float32/float16 `[N, D]` (finite) -> the members of the 8-bit `encoding` (int8 | e4m3) as
    (ext, array): the codes `[N, D]` and the per-region float16 scale `[N]`."""
    x = features.astype(np.float32)
    if encoding == "int8":
        scale = _region_scale(x, INT8_MAX)
        q = np.clip(np.rint(_safe_div(x, scale)), -INT8_MAX, INT8_MAX).astype(np.int8)
        return [(FEATURES_INT8, q), (FEATURES_SCALE, scale)]
    if encoding == "e4m3":
        import torch

        scale = _region_scale(x, E4M3_MAX)
        y = np.clip(_safe_div(x, scale), -E4M3_MAX, E4M3_MAX)  # float16 rounding of the scale may push a hair past
        bits = torch.from_numpy(y).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return [(FEATURES_E4M3, bits), (FEATURES_SCALE, scale)]
    raise EncodingError(f"not an 8-bit feature encoding: {encoding!r}")


def _e4m3_table() -> np.ndarray:
    """float32 [256]: the value of each float8 e4m3fn bit pattern (bias 7, no infinities,
    0x7F/0xFF NaN)."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    value = np.where((b & 0x7F) == 0x7F, np.nan, value)
    return (sign * value).astype(np.float32)


E4M3_TABLE = _e4m3_table()


def decode_features(members: dict[str, np.ndarray]) -> np.ndarray:
    """The members of an 8-bit encoding (already shape/dtype-checked) -> float16 `[N, D]`.
    The float16 rounding runs in torch: numpy's float16 cast alone costs ~250 us for 36 x 2048
    values, the whole int8 decode this way ~50 us (one thread, as in a loader worker); e4m3 codes
    go through a 256-entry float32 table (torch's float8 cast is slower)."""
    import torch

    if FEATURES_INT8 in members:
        x = members[FEATURES_INT8].astype(np.float32)
    else:
        x = np.take(E4M3_TABLE, members[FEATURES_E4M3])
    x *= members[FEATURES_SCALE].astype(np.float32)[:, None]
    return torch.from_numpy(x).to(torch.float16).numpy()


# -- cls_prob --------------------------------------------------------------------------------------
def topk_cls_prob(cls_prob: np.ndarray, topk: int) -> list[tuple[str, np.ndarray]]:
    """`[N, C]` -> the members of `topk:K`: the K largest classes of each region, largest first
    (values float16 `[N, k]`, classes uint16 `[N, k]`; k = min(K, C))."""
    n, c = cls_prob.shape
    if c > MAX_TOPK:
        raise EncodingError(f"cls_prob has {c} classes; top-k stores class indices as uint16 (at most {MAX_TOPK})")
    k = min(topk, c)
    p = cls_prob.astype(np.float32)
    classes = np.argpartition(-p, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(p, classes, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")  # largest first: `shards inspect` reads well
    classes = np.take_along_axis(classes, order, axis=1)
    values = np.take_along_axis(values, order, axis=1)
    return [(CLS_PROB_TOPK_VALUES, values.astype(np.float16)), (CLS_PROB_TOPK_CLASSES, classes.astype(np.uint16))]


def decode_cls_prob(values: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """float16 values / uint16 classes `[N, k]` -> float16 `[N, num_classes]`: zeros with the
    kept values, renormalised to sum 1 per row, scattered in (a row with no kept mass stays
    zero, as a zero float16 row would). Normalised on the [N, k] values: a float32 [N, C] pass
    and its float16 cast would cost ~10x more."""
    kept = values.astype(np.float32)
    total = kept.sum(axis=1, keepdims=True)
    normalised = np.divide(kept, total, out=np.zeros_like(kept), where=total > 0).astype(np.float16)
    out = np.zeros((values.shape[0], num_classes), np.float16)
    np.put_along_axis(out, classes.astype(np.intp), normalised, axis=1)
    return out


def kept_mass(cls_prob: np.ndarray, topk: int) -> np.ndarray:
    """float64 [N]: the share of each row's mass its `topk` largest classes hold (M above;
    KL(decoded || full) = -log M)."""
    p = cls_prob.astype(np.float64)
    k = min(topk, p.shape[1])
    top = -np.partition(-p, k - 1, axis=1)[:, :k]
    return top.sum(axis=1) / p.sum(axis=1)
