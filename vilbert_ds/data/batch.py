"""Batches with named fields. Collate functions build them; the training step reads them.

Floating tensors stay in their storage dtype (float16 features) until `to(device, dtype)`, so
workers ship half the bytes; integer tensors keep their dtype. Non-tensor fields (sample keys,
metadata lists) pass through untouched.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Batch:
    """Base: `to()` moves every tensor field; `size` is the number of examples."""

    def to(self, device: torch.device | str, float_dtype: torch.dtype | None = None, non_blocking: bool = True):
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                dtype = float_dtype if (float_dtype is not None and value.is_floating_point()) else None
                changes[f.name] = value.to(device=device, dtype=dtype, non_blocking=non_blocking)
        return dataclasses.replace(self, **changes)

    def pin_memory(self):
        changes = {f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **changes)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    @property
    def size(self) -> int:
        for value in self.tensors().values():
            return value.size(0)
        return 0


@dataclass
class VisionTextBatch(Batch):
    """What every ViLBERT forward needs. B examples, L tokens, R regions (global region first)."""

    input_ids: torch.Tensor  # [B, L] int64
    token_type_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64, 1 = real token
    image_feat: torch.Tensor  # [B, R, 2048] float16/float32
    image_loc: torch.Tensor  # [B, R, 5] (x1/W, y1/H, x2/W, y2/H, area/(W*H))
    image_mask: torch.Tensor  # [B, R] int64, 1 = real region
    keys: list[str] = field(default_factory=list)  # sample keys, for accounting and predictions


@dataclass
class PretrainBatch(VisionTextBatch):
    """Conceptual Captions pretraining (labels use -1 for "no target")."""

    masked_lm_labels: torch.Tensor | None = None  # [B, L] int64
    image_label: torch.Tensor | None = None  # [B, R-1] int64, 1 = masked region (global excluded)
    image_target: torch.Tensor | None = None  # [B, R-1, 1601] float16 detector class distribution
    is_next: torch.Tensor | None = None  # [B] int64: 0 aligned caption, 1 random caption, -1 none

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return dict(
            input_ids=self.input_ids,
            image_feat=self.image_feat,
            image_loc=self.image_loc,
            token_type_ids=self.token_type_ids,
            attention_mask=self.attention_mask,
            image_attention_mask=self.image_mask,
            masked_lm_labels=self.masked_lm_labels,
            image_label=self.image_label,
            image_target=self.image_target,
            next_sentence_label=self.is_next,
        )
