"""`ViLBert`: the trunk plus pretraining heads, task heads and the pretraining losses.

One class covers both original classes: `BertForMultiModalPreTraining` (`bert.*` + `cls.*`,
config `with_task_heads=false`) and `VILBertForVLTasks` (adds `vil_*`, `vision_logit`,
`linguisic_logit`). The forward computes only the heads asked for (`heads=`), and the
pretraining losses from the masked positions only, so a task step never pays for a
30522-way decoder over every token.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ViLBertConfig
from .heads import PreTrainingHeads, SimpleClassifier, fuse, loss_precision, masked_region_kl
from .vilbert import MASK_VALUE, ViLBertModel

PRETRAIN_HEADS = ("text_prediction", "vision_prediction", "seq_relationship")
TASK_HEADS = (
    "vil_prediction",
    "vil_prediction_gqa",
    "vil_binary_prediction",
    "vil_logit",
    "vil_tri_prediction",
    "vision_logit",
    "linguisic_logit",
)
# Heads whose original name differs from the vilbert-ds field name.
HEAD_ALIASES = {"linguisic_prediction": "text_prediction", "seq_relationship_score": "seq_relationship"}


@dataclass
class ViLBertOutput:
    """Named outputs; a head not asked for (or not in the model) is None.

    Shapes: B batch, L text length (+1 with a task token), R regions.
    """

    sequence_output_t: torch.Tensor  # [B, L, H]
    sequence_output_v: torch.Tensor  # [B, R, V]
    pooled_output_t: torch.Tensor  # [B, C]
    pooled_output_v: torch.Tensor  # [B, C]
    pooled_output: torch.Tensor  # [B, C] fused, before dropout
    text_prediction: torch.Tensor | None = None  # [B, L, vocab] MLM logits (original: linguisic_prediction)
    vision_prediction: torch.Tensor | None = None  # [B, R, v_target_size] region class logits
    seq_relationship: torch.Tensor | None = None  # [B, 2] alignment logits, index 0 = aligned
    vil_prediction: torch.Tensor | None = None  # [B, 3129]
    vil_prediction_gqa: torch.Tensor | None = None  # [B, 1533]
    vil_binary_prediction: torch.Tensor | None = None  # [B/2, 2] (odd B: the alignment logits [B, 2])
    vil_logit: torch.Tensor | None = None  # [B, 1]
    vil_tri_prediction: torch.Tensor | None = None  # [B, 3]
    vision_logit: torch.Tensor | None = None  # [B, R, 1], -10000 added on padded regions
    linguisic_logit: torch.Tensor | None = None  # [B, L, 1]
    all_text_states: list[torch.Tensor] | None = None  # per co-attention block
    all_vision_states: list[torch.Tensor] | None = None
    masked_lm_loss: torch.Tensor | None = None
    masked_img_loss: torch.Tensor | None = None
    next_sentence_loss: torch.Tensor | None = None  # image-text alignment
    loss: torch.Tensor | None = None  # sum of the three (region loss weighted by img_weight)

    @property
    def linguisic_prediction(self) -> torch.Tensor | None:
        return self.text_prediction

    @property
    def alignment_loss(self) -> torch.Tensor | None:
        return self.next_sentence_loss

    def heads(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in PRETRAIN_HEADS + TASK_HEADS
                and getattr(self, f.name) is not None}


def _drop_task_token(seq_t: torch.Tensor, has_task_token: bool) -> torch.Tensor:
    """Text states aligned with the input tokens: [B, L+1, H] -> [B, L, H] when a task token sits at 1."""
    return torch.cat([seq_t[:, :1], seq_t[:, 2:]], dim=1) if has_task_token else seq_t


class ViLBert(nn.Module):
    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.config = config
        self.bert = ViLBertModel(config)
        self.cls = PreTrainingHeads(config, self.bert.embeddings.word_embeddings)
        if config.with_task_heads:
            c, eps = config.bi_hidden_size, config.layer_norm_eps
            self.dropout = nn.Dropout(0.1)
            self.vil_prediction = SimpleClassifier(c, 2 * c, config.num_vqa_labels, eps)
            self.vil_prediction_gqa = SimpleClassifier(c, 2 * c, config.num_gqa_labels, eps)
            self.vil_binary_prediction = SimpleClassifier(2 * c, 2 * c, 2, eps)
            self.vil_logit = nn.Linear(c, 1)
            self.vil_tri_prediction = nn.Linear(c, 3)
            self.vision_logit = nn.Linear(config.v_hidden_size, 1)
            self.linguisic_logit = nn.Linear(config.hidden_size, 1)
        self.available_heads = PRETRAIN_HEADS + (TASK_HEADS if config.with_task_heads else ())
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """The original's init: N(0, initializer_range) for every Linear/Embedding weight (both
        streams), zero biases, LayerNorm 1/0."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def _resolve_heads(self, heads: Iterable[str] | None) -> frozenset[str]:
        if heads is None:
            return frozenset(self.available_heads)
        wanted = frozenset(HEAD_ALIASES.get(h, h) for h in heads)
        missing = wanted - set(self.available_heads)
        if missing:
            raise ValueError(f"unknown or absent heads {sorted(missing)}; this model has {list(self.available_heads)}")
        return wanted

    def forward(
        self,
        input_ids: torch.Tensor,
        image_feat: torch.Tensor,
        image_loc: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        *,
        heads: Iterable[str] | None = None,
        output_all_encoded_layers: bool = False,
        masked_lm_labels: torch.Tensor | None = None,
        image_label: torch.Tensor | None = None,
        image_target: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        visual_target: int = 0,
        img_weight: float = 1.0,
    ) -> ViLBertOutput:
        """Inputs: input_ids/token_type_ids/attention_mask [B, L]; image_feat [B, R, 2048];
        image_loc [B, R, 5]; image_attention_mask [B, R]; task_ids [B, 1] or [B].

        Pretraining labels (all optional, -1 = ignore): masked_lm_labels [B, L];
        image_label [B, R-1] (1 = masked region; excludes the global region 0);
        image_target [B, R-1, v_target_size] detector class distribution (visual_target 0) or
        [B, R-1, 2048] features (visual_target 1); next_sentence_label [B] (0 aligned, 1 not).
        `heads=None` computes every head the model has (the original behaviour).
        """
        wanted = self._resolve_heads(heads)
        seq_t, seq_v, pooled_t, pooled_v, blocks = self.bert(
            input_ids, image_feat, image_loc, token_type_ids, attention_mask, image_attention_mask, task_ids,
            output_all_encoded_layers,
        )
        has_task_token = task_ids is not None
        cfg = self.config
        fused = fuse(pooled_t, pooled_v, cfg.fusion_method)
        out = ViLBertOutput(seq_t, seq_v, pooled_t, pooled_v, fused)
        if blocks is not None:
            out.all_text_states, out.all_vision_states = blocks

        cls = self.cls
        need_alignment = "seq_relationship" in wanted or next_sentence_label is not None or (
            "vil_binary_prediction" in wanted and fused.size(0) % 2 == 1
        )
        if need_alignment:
            out.seq_relationship = cls.bi_seq_relationship(cls.dropout(fused))
        if "text_prediction" in wanted:
            out.text_prediction = cls.predictions(seq_t)
        if "vision_prediction" in wanted:
            out.vision_prediction = cls.imagePredictions(seq_v)

        if cfg.with_task_heads and wanted & set(TASK_HEADS):
            h = self.dropout(fused)
            if "vil_prediction" in wanted:
                out.vil_prediction = self.vil_prediction(h)
            if "vil_prediction_gqa" in wanted:
                out.vil_prediction_gqa = self.vil_prediction_gqa(h)
            if "vil_binary_prediction" in wanted:
                # Rows (2i, 2i+1) are the two images of one NLVR2 example; the original silently
                # returns the alignment logits when the batch is odd.
                if h.size(0) % 2 == 0:
                    out.vil_binary_prediction = self.vil_binary_prediction(h.reshape(-1, 2 * h.size(1)))
                else:
                    out.vil_binary_prediction = out.seq_relationship
            if "vil_logit" in wanted:
                out.vil_logit = self.vil_logit(h)
            if "vil_tri_prediction" in wanted:
                out.vil_tri_prediction = self.vil_tri_prediction(h)
            if "vision_logit" in wanted:
                if image_attention_mask is None:
                    image_attention_mask = seq_v.new_ones(seq_v.shape[:2])
                pad = ((1.0 - image_attention_mask.to(seq_v.dtype)) * MASK_VALUE)[:, :, None]
                out.vision_logit = self.vision_logit(self.dropout(seq_v)) + pad
            if "linguisic_logit" in wanted:
                out.linguisic_logit = self.linguisic_logit(self.dropout(seq_t))

        if masked_lm_labels is not None or image_label is not None or next_sentence_label is not None:
            self._pretraining_losses(out, has_task_token, masked_lm_labels, image_label, image_target,
                                     next_sentence_label, visual_target, img_weight)
        return out

    # ------------------------------------------------------------------------ losses
    def _pretraining_losses(self, out, has_task_token, lm_labels, image_label, image_target, is_next,
                            visual_target, img_weight):
        """Losses as the original, but computed on the masked positions only, and 0 (not NaN)
        when a batch has nothing to predict for an objective."""
        losses = []
        if lm_labels is not None:
            text = _drop_task_token(out.sequence_output_t, has_task_token)
            picked = lm_labels != -1
            logits = self.cls.predictions(text[picked])  # [N, vocab]
            ce = F.cross_entropy(loss_precision(logits), lm_labels[picked], reduction="sum")
            out.masked_lm_loss = ce / picked.sum().clamp(min=1)
            losses.append(out.masked_lm_loss)
        if image_label is not None:
            if image_target is None:
                raise ValueError("image_label given without image_target")
            picked = image_label == 1
            regions = out.sequence_output_v[:, 1:][picked]  # the global region 0 is never a target
            pred = self.cls.imagePredictions(regions)  # [N, T]
            target = image_target[picked]
            count = picked.sum().clamp(min=1)
            if visual_target == 0:
                out.masked_img_loss = masked_region_kl(pred, target) / count
            elif visual_target == 1:
                if pred.size(-1) != target.size(-1):
                    raise ValueError(
                        f"visual_target 1 regresses features: v_target_size={pred.size(-1)} must equal the "
                        f"target width {target.size(-1)}"
                    )
                mse = F.mse_loss(loss_precision(pred), loss_precision(target), reduction="sum")
                out.masked_img_loss = mse / (count * target.size(-1))
            else:
                raise ValueError(f"visual_target={visual_target}: vilbert-ds implements 0 (KL) and 1 (MSE)")
            losses.append(img_weight * out.masked_img_loss)
        if is_next is not None:
            picked = is_next != -1
            ce = F.cross_entropy(loss_precision(out.seq_relationship[picked]), is_next[picked], reduction="sum")
            out.next_sentence_loss = ce / picked.sum().clamp(min=1)
            losses.append(out.next_sentence_loss)
        out.loss = torch.stack(losses).sum() if losses else None


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (the tied decoder counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
