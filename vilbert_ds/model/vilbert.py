"""The ViLBERT trunk: two transformer streams joined by co-attention blocks.

Module and parameter names equal the original 12-in-1 code's (`bert.encoder.c_layer.0.biattention.
query1.weight`, ...), so a state dict moves between the two with no renaming. Numerics follow the
original: post-LN layers, exact (erf) GELU, additive -10000 padding masks, ReLU poolers on position 0
of each stream, the task token inserted at text position 1 after the position/type sum.

Shapes: B batch, L text tokens, R regions (incl. the global mean region at index 0),
H text width (768), V vision width (1024), C co-attention width (1024).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ViLBertConfig

MASK_VALUE = -10000.0  # the original's additive mask; not finfo.min (matters only for all-padded rows)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)  # exact erf form, as the original's gelu()


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


ACT2FN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": _gelu, "relu": F.relu, "swish": _swish}


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] 1/0 padding mask -> [B, 1, 1, S] additive mask (0 keep, -10000 pad)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float, impl: str
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with dropout on the probabilities.

    q [B, heads, Lq, d], k/v [B, heads, Lk, d], mask additive [B, 1, 1, Lk] -> [B, heads, Lq, d].
    "sdpa" lets PyTorch pick a fused kernel (flash / memory-efficient / math); "eager" is the
    original's explicit computation, kept for comparisons and benchmarks.
    """
    mask = mask.to(q.dtype)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.size(-1)) + mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, w = x.shape
    return x.view(b, n, heads, w // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


# ------------------------------------------------------------------------------ layers
class SelfAttention(nn.Module):
    """Multi-head self-attention projections (`query`, `key`, `value`)."""

    def __init__(self, width: int, heads: int, dropout: float, impl: str):
        super().__init__()
        self.heads, self.dropout_p, self.impl = heads, dropout, impl
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(proj(x), self.heads) for proj in (self.query, self.key, self.value))
        p = self.dropout_p if self.training else 0.0
        return _merge_heads(attend(q, k, v, mask, p, self.impl))


class ResidualOutput(nn.Module):
    """dense -> dropout -> + residual -> LayerNorm (BertSelfOutput / BertOutput)."""

    def __init__(self, in_width: int, width: int, dropout: float, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Intermediate(nn.Module):
    def __init__(self, width: int, inner: int, act: str):
        super().__init__()
        self.dense = nn.Linear(width, inner)
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, attn_dropout: float, dropout: float, eps: float, impl: str):
        super().__init__()
        self.self = SelfAttention(width, heads, attn_dropout, impl)
        self.output = ResidualOutput(width, width, dropout, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class TransformerLayer(nn.Module):
    """A post-LN BERT layer; the text stream's `BertLayer` and the vision stream's
    `BertImageLayer` differ only in width, head count and FFN size."""

    def __init__(self, width: int, heads: int, inner: int, act: str, attn_dropout: float, dropout: float,
                 eps: float, impl: str):
        super().__init__()
        self.attention = Attention(width, heads, attn_dropout, dropout, eps, impl)
        self.intermediate = Intermediate(width, inner, act)
        self.output = ResidualOutput(inner, width, dropout, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BiAttention(nn.Module):
    """Co-attention: text queries attend over vision keys/values and vision queries over text.

    Names follow the original: `*1` project the vision stream, `*2` the text stream.
    """

    def __init__(self, cfg: ViLBertConfig):
        super().__init__()
        c = cfg.bi_hidden_size
        self.heads, self.impl = cfg.bi_num_attention_heads, cfg.attention_impl
        self.query1 = nn.Linear(cfg.v_hidden_size, c)
        self.key1 = nn.Linear(cfg.v_hidden_size, c)
        self.value1 = nn.Linear(cfg.v_hidden_size, c)
        self.query2 = nn.Linear(cfg.hidden_size, c)
        self.key2 = nn.Linear(cfg.hidden_size, c)
        self.value2 = nn.Linear(cfg.hidden_size, c)
        self.dropout_v = cfg.v_attention_probs_dropout_prob  # on text->vision probabilities
        self.dropout_t = cfg.attention_probs_dropout_prob  # on vision->text probabilities

    def forward(self, v: torch.Tensor, v_mask: torch.Tensor, t: torch.Tensor, t_mask: torch.Tensor):
        """v [B, R, V], t [B, L, H] -> (text-side context [B, L, C], vision-side context [B, R, C])."""
        h = self.heads
        qv, kv, vv = (_split_heads(p(v), h) for p in (self.query1, self.key1, self.value1))
        qt, kt, vt = (_split_heads(p(t), h) for p in (self.query2, self.key2, self.value2))
        train = self.training
        text_ctx = attend(qt, kv, vv, v_mask, self.dropout_v if train else 0.0, self.impl)
        vision_ctx = attend(qv, kt, vt, t_mask, self.dropout_t if train else 0.0, self.impl)
        return _merge_heads(text_ctx), _merge_heads(vision_ctx)


class BiOutput(nn.Module):
    """Projects each co-attention context back to its stream, with residual and LayerNorm.

    `q_dense1`/`q_dense2` exist in the original (and its checkpoints) but are never used; they
    are kept so that parameter counts and state dicts match, and frozen so that no optimiser
    state is spent on them.
    """

    def __init__(self, cfg: ViLBertConfig):
        super().__init__()
        c, eps = cfg.bi_hidden_size, cfg.layer_norm_eps
        self.dense1 = nn.Linear(c, cfg.v_hidden_size)
        self.LayerNorm1 = nn.LayerNorm(cfg.v_hidden_size, eps=eps)
        self.dropout1 = nn.Dropout(cfg.v_hidden_dropout_prob)
        self.q_dense1 = nn.Linear(c, cfg.v_hidden_size)
        self.dense2 = nn.Linear(c, cfg.hidden_size)
        self.LayerNorm2 = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.dropout2 = nn.Dropout(cfg.hidden_dropout_prob)
        self.q_dense2 = nn.Linear(c, cfg.hidden_size)
        for p in (*self.q_dense1.parameters(), *self.q_dense2.parameters()):
            p.requires_grad_(False)

    def forward(self, vision_ctx, v, text_ctx, t):
        v = self.LayerNorm1(self.dropout1(self.dense1(vision_ctx)) + v)
        t = self.LayerNorm2(self.dropout2(self.dense2(text_ctx)) + t)
        return v, t


class ConnectionLayer(nn.Module):
    """A co-attention block: cross-attention sublayer, then one FFN sublayer per stream."""

    def __init__(self, cfg: ViLBertConfig):
        super().__init__()
        eps = cfg.layer_norm_eps
        self.biattention = BiAttention(cfg)
        self.biOutput = BiOutput(cfg)
        self.v_intermediate = Intermediate(cfg.v_hidden_size, cfg.v_intermediate_size, cfg.v_hidden_act)
        self.v_output = ResidualOutput(cfg.v_intermediate_size, cfg.v_hidden_size, cfg.v_hidden_dropout_prob, eps)
        self.t_intermediate = Intermediate(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.t_output = ResidualOutput(cfg.intermediate_size, cfg.hidden_size, cfg.hidden_dropout_prob, eps)

    def forward(self, v, v_mask, t, t_mask):
        text_ctx, vision_ctx = self.biattention(v, v_mask, t, t_mask)
        v, t = self.biOutput(vision_ctx, v, text_ctx, t)
        v = self.v_output(self.v_intermediate(v), v)
        t = self.t_output(self.t_intermediate(t), t)
        return v, t


# -------------------------------------------------------------------------- embeddings
class TextEmbeddings(nn.Module):
    """word + position + token type, [task token at position 1], LayerNorm, dropout."""

    def __init__(self, cfg: ViLBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        if cfg.task_specific_tokens:
            self.task_embeddings = nn.Embedding(cfg.num_task_tokens, cfg.hidden_size)

    def forward(self, input_ids, token_type_ids, task_ids=None):
        """input_ids/token_type_ids [B, L], task_ids [B, 1] -> [B, L(+1), H]."""
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        x = x + self.token_type_embeddings(token_type_ids)
        if task_ids is not None:
            # The task token has no position/type embedding; the text keeps positions 0..L-1.
            x = torch.cat([x[:, :1], self.task_embeddings(task_ids), x[:, 1:]], dim=1)
        return self.dropout(self.LayerNorm(x))


class ImageEmbeddings(nn.Module):
    """Linear(region features) + Linear(5-d box location), LayerNorm, dropout."""

    def __init__(self, cfg: ViLBertConfig):
        super().__init__()
        self.image_embeddings = nn.Linear(cfg.v_feature_size, cfg.v_hidden_size)
        self.image_location_embeddings = nn.Linear(5, cfg.v_hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.v_hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, image_feat, image_loc):
        """image_feat [B, R, 2048], image_loc [B, R, 5] -> [B, R, V]."""
        return self.dropout(self.LayerNorm(self.image_embeddings(image_feat) + self.image_location_embeddings(image_loc)))


class Pooler(nn.Module):
    """Position 0 -> Linear -> ReLU (the original's poolers; not BERT's tanh pooler)."""

    def __init__(self, width: int, out: int):
        super().__init__()
        self.dense = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.dense(x[:, 0]))


# ----------------------------------------------------------------------------- encoder
def _checkpoint(fn, *args):
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


class Encoder(nn.Module):
    """Text layers `layer`, vision layers `v_layer`, co-attention blocks `c_layer`, run in the
    original schedule: for each pair (v_id, t_id) the text layers up to t_id, the vision layers
    up to v_id, then the co-attention block; afterwards the remaining vision and text layers."""

    def __init__(self, cfg: ViLBertConfig):
        super().__init__()
        eps, impl = cfg.layer_norm_eps, cfg.attention_impl
        self.layer = nn.ModuleList(
            TransformerLayer(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act,
                             cfg.attention_probs_dropout_prob, cfg.hidden_dropout_prob, eps, impl)
            for _ in range(cfg.num_hidden_layers)
        )
        self.v_layer = nn.ModuleList(
            TransformerLayer(cfg.v_hidden_size, cfg.v_num_attention_heads, cfg.v_intermediate_size, cfg.v_hidden_act,
                             cfg.v_attention_probs_dropout_prob, cfg.v_hidden_dropout_prob, eps, impl)
            for _ in range(cfg.v_num_hidden_layers)
        )
        self.c_layer = nn.ModuleList(ConnectionLayer(cfg) for _ in range(len(cfg.v_biattention_id)))
        self.schedule = list(zip(cfg.v_biattention_id, cfg.t_biattention_id))
        self.fixed_t_layer, self.fixed_v_layer = cfg.fixed_t_layer, cfg.fixed_v_layer
        self.gradient_checkpointing = cfg.gradient_checkpointing
        # Replaceable from outside (e.g. deepspeed.checkpointing.checkpoint); the model file
        # itself imports no distributed code.
        self.checkpoint_fn: Callable = _checkpoint

    def _call(self, module: nn.Module, frozen: bool, *args):
        if frozen:
            with torch.no_grad():
                return module(*args)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self.checkpoint_fn(module, *args)
        return module(*args)

    def forward(self, t, t_mask, v, v_mask, output_all_encoded_layers: bool = False):
        """t [B|1, L, H], v [B, R, V], additive masks -> (t, v, per-block states or None).

        A text batch of 1 against an image batch of N is broadcast at the first co-attention
        block (the original's `fast_mode`): the caption's leading text layers run once.
        """
        t_start = v_start = 0
        blocks_t, blocks_v = [], []
        for k, (v_end, t_end) in enumerate(self.schedule):
            for i in range(t_start, t_end):
                t = self._call(self.layer[i], i < self.fixed_t_layer, t, t_mask)
            for i in range(v_start, v_end):
                v = self._call(self.v_layer[i], i < self.fixed_v_layer, v, v_mask)
            if k == 0 and t.size(0) == 1 and v.size(0) > 1:
                t = t.expand(v.size(0), -1, -1)
                t_mask = t_mask.expand(v.size(0), -1, -1, -1)
            v, t = self._call(self.c_layer[k], False, v, v_mask, t, t_mask)
            t_start, v_start = t_end, v_end
            if output_all_encoded_layers:
                blocks_t.append(t)
                blocks_v.append(v)
        for i in range(v_start, len(self.v_layer)):
            v = self._call(self.v_layer[i], i < self.fixed_v_layer, v, v_mask)
        for i in range(t_start, len(self.layer)):
            t = self._call(self.layer[i], i < self.fixed_t_layer, t, t_mask)
        if output_all_encoded_layers:
            return t, v, (blocks_t, blocks_v)
        return t, v, None


class ViLBertModel(nn.Module):
    """The `bert.*` trunk: embeddings, encoder and the two poolers."""

    def __init__(self, cfg: ViLBertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.v_embeddings = ImageEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.t_pooler = Pooler(cfg.hidden_size, cfg.bi_hidden_size)
        self.v_pooler = Pooler(cfg.v_hidden_size, cfg.bi_hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        image_feat: torch.Tensor,
        image_loc: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
        output_all_encoded_layers: bool = False,
    ):
        """Returns (seq_t [B, L(+1), H], seq_v [B, R, V], pooled_t [B, C], pooled_v [B, C], blocks).

        With `output_all_encoded_layers` the original returns the states after each co-attention
        block and pools from the last of them (ignoring the trailing layers); so does this.
        """
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if image_attention_mask is None:
            image_attention_mask = image_feat.new_ones(image_feat.shape[:2])
        if task_ids is not None:
            if not hasattr(self.embeddings, "task_embeddings"):
                raise ValueError("task_ids given but the config has task_specific_tokens=false")
            if task_ids.dim() == 1:
                task_ids = task_ids[:, None]
            attention_mask = torch.cat([attention_mask.new_ones(attention_mask.size(0), 1), attention_mask], dim=1)
        t = self.embeddings(input_ids, token_type_ids, task_ids)
        v = self.v_embeddings(image_feat, image_loc)
        t_mask = additive_mask(attention_mask, t.dtype)
        v_mask = additive_mask(image_attention_mask, v.dtype)
        t, v, blocks = self.encoder(t, t_mask, v, v_mask, output_all_encoded_layers)
        if blocks is not None:
            t, v = blocks[0][-1], blocks[1][-1]
        return t, v, self.t_pooler(t), self.v_pooler(v), blocks
