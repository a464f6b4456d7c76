"""Region rows that mix detected boxes with ground-truth boxes, and IoU targets over them.

Shared by the families that need the image's annotated boxes as extra regions: refer (RefCOCO*,
training only), pointing (Visual7W, GuessWhat pointing: the candidates *are* GT boxes) and VCR
(the question refers to GT detections). A task sample carries the detected regions in the main
image slot ("") and the GT-box features in slot "gt" (docs/TASKS.md), each as
`features.npy` float16 [N, 2048] + `boxes.npy` float32 [N, 4] absolute x1 y1 x2 y2 + `json`
with the image size. Neither slot stores a global region: the GT set's own global entry of the
original LMDBs is dropped by construction, and the one global region (row 0) is built here.

Row layout of `RegionRows` (R rows in all, R <= max_regions):
    row 0                     global region: mean feature, box (0, 0, W, H), loc (0, 0, 1, 1, 1)
    rows 1 .. num_detected-1  detected boxes (in shard order)
    rows num_detected .. R-1  GT boxes (in shard order)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from .base import sample_member, slot_member
from .metrics import box_iou

GT_SLOT = "gt"


@dataclass
class RegionRows:
    """The model's region rows for one image. feat [R, 2048] float16, loc [R, 5] float32
    (x1/W, y1/H, x2/W, y2/H, area/(W*H)), boxes [R, 4] float32 absolute pixels (row 0 is the
    whole image), num_detected = rows before the first GT row (global region included)."""

    feat: np.ndarray
    loc: np.ndarray
    boxes: np.ndarray
    num_detected: int
    num_gt: int

    @property
    def num_rows(self) -> int:
        return int(self.feat.shape[0])


def _slot(sample: Mapping[str, Any], slot: str) -> tuple[np.ndarray, np.ndarray, float, float]:
    meta = sample_member(sample, slot_member(slot, "json"))
    feats = sample_member(sample, slot_member(slot, "features.npy"))
    boxes = sample_member(sample, slot_member(slot, "boxes.npy"))
    where = f"task sample {sample.get('__key__', '?')!r} slot {slot or 'main'!r}"
    if feats.ndim != 2 or boxes.shape != (feats.shape[0], 4):
        raise ValueError(f"{where}: features {feats.shape} and boxes {boxes.shape} do not match")
    w, h = float(meta["image_w"]), float(meta["image_h"])
    if w <= 0 or h <= 0:
        raise ValueError(f"{where}: image size {w}x{h} must be positive")
    return feats, boxes.astype(np.float32), w, h


def normalized_loc(boxes: np.ndarray, w: float, h: float) -> np.ndarray:
    """[N, 4] absolute boxes -> [N, 5] (x1/W, y1/H, x2/W, y2/H, area/(W*H)) float32."""
    b = boxes.astype(np.float32)
    loc = np.empty((b.shape[0], 5), dtype=np.float32)
    loc[:, 0] = b[:, 0] / w
    loc[:, 1] = b[:, 1] / h
    loc[:, 2] = b[:, 2] / w
    loc[:, 3] = b[:, 3] / h
    loc[:, 4] = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (w * h)
    return loc


def region_rows(sample: Mapping[str, Any], max_regions: int, *, with_gt: bool, gt_priority: bool = False,
                global_over_gt: bool = False) -> RegionRows:
    """Detected (+ GT) region rows of a task sample, at most `max_regions` rows.

    with_gt=False: the original reader's rows (global + detected, truncated).
    gt_priority=False (refer, the original): rows are global + detected + GT, truncated from the end,
    so GT rows go first when there is no room. gt_priority=True (pointing, VCR): GT rows are kept
    (at most max_regions - 1) and detected rows give way to them.
    global_over_gt=True (VCR, the original): the global feature is the mean of the detected mean
    and the GT mean weighted by their counts + 1 (the original's num_boxes incl. its global entry);
    otherwise the mean of the detected features."""
    if max_regions < 2:
        raise ValueError(f"max_regions={max_regions} must be >= 2 (global region + one box)")
    feats, boxes, w, h = _slot(sample, "")
    n_det = int(feats.shape[0])
    if n_det == 0:
        raise ValueError(f"task sample {sample.get('__key__', '?')!r}: 0 detected regions (no global mean region)")
    if with_gt:
        gt_feats, gt_boxes, gw, gh = _slot(sample, GT_SLOT)
        if (gw, gh) != (w, h):
            raise ValueError(f"task sample {sample.get('__key__', '?')!r}: GT features say image size {gw}x{gh}, "
                             f"detected features {w}x{h}; they must describe the same image")
    else:
        gt_feats = np.zeros((0, feats.shape[1]), dtype=np.float16)
        gt_boxes = np.zeros((0, 4), dtype=np.float32)
    n_gt = int(gt_feats.shape[0])

    mean = feats.astype(np.float32).mean(axis=0)
    if global_over_gt and n_gt:
        gt_mean = gt_feats.astype(np.float32).mean(axis=0)
        mean = (mean * (n_det + 1) + gt_mean * (n_gt + 1)) / (n_det + n_gt + 2)

    if gt_priority:
        keep_gt = min(n_gt, max_regions - 1)
        keep_det = min(n_det, max_regions - 1 - keep_gt)
    else:
        keep_det = min(n_det, max_regions - 1)
        keep_gt = min(n_gt, max_regions - 1 - keep_det)
    rows = 1 + keep_det + keep_gt
    feat = np.empty((rows, feats.shape[1]), dtype=np.float16)
    feat[0] = mean
    feat[1:1 + keep_det] = feats[:keep_det]
    feat[1 + keep_det:] = gt_feats[:keep_gt]
    abs_boxes = np.empty((rows, 4), dtype=np.float32)
    abs_boxes[0] = (0.0, 0.0, w, h)
    abs_boxes[1:1 + keep_det] = boxes[:keep_det]
    abs_boxes[1 + keep_det:] = gt_boxes[:keep_gt]
    loc = normalized_loc(abs_boxes, w, h)
    loc[0] = (0.0, 0.0, 1.0, 1.0, 1.0)
    return RegionRows(feat, loc, abs_boxes, num_detected=1 + keep_det, num_gt=keep_gt)


def iou_with(boxes: np.ndarray, box: Any) -> np.ndarray:
    """IoU of every row box [N, 4] with one box (x1 y1 x2 y2) -> [N] float32, in the original's
    +1-pixel convention (`box_iou(pixel_inclusive=True)`), which its refer and pointing targets
    and scores use."""
    ref = np.asarray(box, dtype=np.float32).reshape(1, 4)
    return box_iou(torch.from_numpy(np.asarray(boxes, dtype=np.float32)), torch.from_numpy(ref),
                   pixel_inclusive=True)[:, 0].numpy()


def iou_targets(boxes: np.ndarray, box: Any, threshold: float | None) -> np.ndarray:
    """IoU with the referred box; below `threshold` set to 0 (the original's training targets),
    raw when threshold is None (its evaluation targets)."""
    iou = iou_with(boxes, box)
    if threshold is not None:
        iou = np.where(iou < threshold, 0.0, iou).astype(np.float32)
    return iou


def xywh_to_xyxy(box: Any) -> list[float]:
    """COCO [x, y, w, h] -> [x1, y1, x2, y2] (continuous coordinates, as the detector boxes)."""
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


def match_boxes(candidates: np.ndarray, rows: np.ndarray, where: str, min_iou: float = 0.99) -> np.ndarray:
    """For each candidate box [C, 4] the index of the row box [M, 4] it is (IoU >= min_iou):
    GT-box features are found by their box, whatever order the GT feature set stores them in."""
    if rows.shape[0] == 0:
        raise ValueError(f"{where}: the GT feature set has no boxes for this image")
    iou = box_iou(torch.from_numpy(np.asarray(candidates, dtype=np.float32)), torch.from_numpy(rows))
    best, idx = iou.max(dim=1)
    bad = (best < min_iou).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{where}: candidate box(es) {[np.asarray(candidates)[i].tolist() for i in bad]} have no "
                         f"GT feature row with the same box (best IoU {[round(float(best[i]), 3) for i in bad]}); "
                         f"the GT feature set does not match the annotations")
    return idx.numpy().astype(np.int64)
