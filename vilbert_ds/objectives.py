"""What a training run minimises: "model + loss" modules and the task loss scales.

Both objectives are `forward(batch) -> (loss, metrics)`; DeepSpeed wraps them. Metrics are
scalar tensors (averaged over micro-batches and ranks when logged) or `Ratio(num, den)` pairs
(summed, then divided: accuracies).

- `PretrainObjective`: the original's three pretraining losses, masked-LM + img_weight x
  masked-region + alignment, on the masked positions only.
- `TaskObjective`: every selected task's loss, dispatched on `batch.task` to the task's family
  (its heads only, task token = its id). Each task's loss is weighted by the sampler's
  `loss_scales()` (the original's lr_t / min lr), applied by the trainer before backward.
The lr rules (`engine.base_lr`, `engine.lr_rule`) live with the parameter groups they shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .data.batch import PretrainBatch
from .model import ViLBert
from .tasks.base import TaskBatch, TaskFamily

PRETRAIN_HEADS = ("seq_relationship",)  # MLM / region heads run on masked positions only, inside the losses


@dataclass
class Ratio:
    """A metric reduced as sum(num) / sum(den) over micro-batches and ranks (e.g. accuracy)."""

    num: torch.Tensor
    den: torch.Tensor


class PretrainObjective(nn.Module):
    """ViLBERT + its three pretraining losses: `forward(batch) -> (loss, metrics)`.

    loss = masked_lm + img_weight * masked_region + alignment (the original's sum).
    """

    def __init__(self, model: ViLBert, *, visual_target: int = 0, img_weight: float = 1.0):
        super().__init__()
        self.model = model
        self.visual_target = visual_target
        self.img_weight = img_weight

    def forward(self, batch: PretrainBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self.model(**batch.model_inputs(), heads=PRETRAIN_HEADS, visual_target=self.visual_target,
                         img_weight=self.img_weight)
        metrics: dict[str, Any] = {
            "masked_lm_loss": out.masked_lm_loss,
            "masked_img_loss": out.masked_img_loss,
            "alignment_loss": out.next_sentence_loss,
        }
        if batch.is_next is not None:
            with torch.no_grad():
                picked = batch.is_next != -1
                correct = (out.seq_relationship.argmax(-1) == batch.is_next) & picked
                metrics["alignment_acc"] = Ratio(correct.sum(), picked.sum())
        return out.loss, metrics


class TaskObjective(nn.Module):
    """ViLBERT + every selected task's loss: `forward(batch) -> (loss, {"score"})`, dispatched on
    `batch.task`. Families are plain objects (no parameters): the heads are the model's."""

    def __init__(self, model: ViLBert, families: Mapping[str, TaskFamily]):
        super().__init__()
        self.model = model
        self.families = dict(families)

    def forward(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        family = self.families[batch.task]
        return family.loss(family.forward(self.model, batch), batch)
