"""Pretraining heads (`cls.*`) and the 12-in-1 task heads (`vil_*`, `vision_logit`, ...)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ViLBertConfig
from .vilbert import ACT2FN


class PredictionHeadTransform(nn.Module):
    """dense -> activation -> LayerNorm (`transform.*` of the MLM and region heads)."""

    def __init__(self, width: int, act: str, eps: float):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = ACT2FN[act]
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class LMPredictionHead(nn.Module):
    """Masked-LM head; `decoder.weight` is the word embedding matrix itself (tied)."""

    def __init__(self, cfg: ViLBertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = PredictionHeadTransform(cfg.hidden_size, cfg.hidden_act, cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., vocab]"""
        return self.decoder(self.transform(x)) + self.bias


class ImagePredictionHead(nn.Module):
    """Masked-region head: [..., V] -> [..., v_target_size] (detector class logits).

    The original builds its transform with `hidden_act` (not `v_hidden_act`); so does this.
    """

    def __init__(self, cfg: ViLBertConfig):
        super().__init__()
        self.transform = PredictionHeadTransform(cfg.v_hidden_size, cfg.hidden_act, cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.v_hidden_size, cfg.v_target_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class PreTrainingHeads(nn.Module):
    """`cls.*`: MLM, masked-region and image-text alignment heads. `dropout` (p=0.1, fixed in the
    original) acts on the fused pooled vector before `bi_seq_relationship`."""

    def __init__(self, cfg: ViLBertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = LMPredictionHead(cfg, word_embeddings)
        self.bi_seq_relationship = nn.Linear(cfg.bi_hidden_size, 2)
        self.imagePredictions = ImagePredictionHead(cfg)
        self.dropout = nn.Dropout(0.1)


class SimpleClassifier(nn.Module):
    """Linear -> GELU -> LayerNorm -> Linear (state keys `logit_fc.0/.2/.3`)."""

    def __init__(self, in_dim: int, hid_dim: int, out_dim: int, eps: float = 1e-12):
        super().__init__()
        self.logit_fc = nn.Sequential(
            nn.Linear(in_dim, hid_dim), nn.GELU(), nn.LayerNorm(hid_dim, eps=eps), nn.Linear(hid_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit_fc(x)


def fuse(pooled_t: torch.Tensor, pooled_v: torch.Tensor, method: str) -> torch.Tensor:
    """Fusion of the two pooled vectors, [B, C] x [B, C] -> [B, C]."""
    return pooled_t * pooled_v if method == "mul" else pooled_t + pooled_v


def loss_precision(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in at least float32: fp16/bf16 are upcast, float64 stays float64
    (a float64 model must reproduce the original's float64 losses to 1e-10)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_region_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed KL(target || softmax(logits)) over rows: logits/target [N, T] -> scalar."""
    return F.kl_div(F.log_softmax(loss_precision(logits), dim=-1), loss_precision(target), reduction="sum")
