"""Conceptual Captions pretraining: masking, negatives and collate, as the original does them.

Per sample (reference section 2; `vilbert/datasets/concept_cap_dataset.py` BertPreprocessBatch):
1. Negative caption: with objective 0/1, probability 0.5 the caption is replaced by one drawn
   uniformly from the caption pool (the original `caption_train.json` values), is_next = 1;
   objective 2 never replaces and sets is_next = -1 (no alignment target).
2. Text: WordPiece ids of the caption without special tokens, truncated to max_seq_length - 2;
   each token with p = mask_prob is a target: 80% [MASK], 10% a random id in [0, vocab), 10%
   unchanged; label = original id, else -1. Then [CLS] ... [SEP], padding id 0 to
   max_seq_length, segment ids 0.
3. Regions: the first max_regions detections are kept. Each with p = mask_prob is a target
   (image_label 1, else -1): 90% of them have their feature zeroed, 10% keep it. Regions whose
   IoU (pixel +1 convention) with a target exceeds 0.4 form the overlap set; as in the original,
   it only changes the denominator of the global region.
4. Global region 0: sum of the (masked) region features / (number of real regions outside the
   overlap set, at least 1), box (0, 0, 1, 1, 1). With 36 regions this is exactly the
   original's `sum / count(masked_label == 0)`; the original only runs with 36.
5. Objective 1: masked-modelling labels of negatives (is_next = 1) are set to -1 (the original
   does this in its training loop, on the same inputs).
Locations are (x1/W, y1/H, x2/W, y2/H, (x2-x1)(y2-y1)/(W*H)).

All randomness of a sample comes from `stream.sample_rng(seed, epoch, key)`, so it is the same
whatever the worker layout and after a resume.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from . import storage
from .batch import PretrainBatch
from .cache import CacheSpec
from .config import DataConfig
from .manifest import Manifest, load_source
from .sample import Sample
from .tokenizer import load_tokenizer
from .stream import ReadOptions, Source, StreamingLoader, batch_tensor, sample_rng

log = logging.getLogger(__name__)

OVERLAP_IOU = 0.4  # regions overlapping a masked one above this IoU leave the global-mean denominator


def iou_matrix(boxes: np.ndarray, others: np.ndarray | None = None) -> np.ndarray:
    """[K, N] IoU of absolute x1y1x2y2 `boxes` [K, 4] with `others` [N, 4] (default: boxes),
    with the original's +1 pixel convention."""
    a = boxes.astype(np.float64)
    b = a if others is None else others.astype(np.float64)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


@dataclass
class TextPart:
    """The text half of a pretraining batch (B examples, L = max_seq_length, R = max_regions)."""

    input_ids: np.ndarray  # [B, L] int64: [CLS] masked tokens [SEP] padding
    attention_mask: np.ndarray  # [B, L] int64
    masked_lm_labels: np.ndarray  # [B, L] int64, -1 = no target
    is_next: np.ndarray  # [B] int64: 0 aligned, 1 random caption, -1 no alignment target
    region_draws: np.ndarray  # [B, R] float64: each image's region-mask draws (1.0 past its regions)


@dataclass
class RegionPart:
    """The image half of a pretraining batch (global region first)."""

    image_feat: torch.Tensor  # [B, R+1, D] float16
    image_target: torch.Tensor  # [B, R, C] float16
    image_loc: np.ndarray  # [B, R+1, 5] float32
    image_mask: np.ndarray  # [B, R+1] int64
    image_label: np.ndarray  # [B, R] int64: 1 masked region, -1 not


class PretrainCollate:
    """(samples, epoch) -> PretrainBatch. Picklable; `setup()` loads the tokenizer and caption
    pool (build_pretrain_loader calls it before the workers fork, so they inherit both).

    Writes every sample straight into the batch tensors (features stay float16: one copy from
    the shard bytes into the batch; the global region is summed in float32)."""

    def __init__(self, cfg: DataConfig, seed: int, caption_pool_url: str | None, num_classes: int | None):
        self.cfg = cfg
        self.seed = seed
        self.caption_pool_url = caption_pool_url
        self.num_classes = num_classes
        self.tokenizer = None
        self.pool: list[str] | None = None

    def setup(self) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.cfg.vocab)
            self.vocab_size = len(self.tokenizer)
            self.mask_id = self.tokenizer.mask_token_id
            self.cls_id, self.sep_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        if self.pool is None and self.cfg.objective != 2:
            self.pool = load_caption_pool(self.caption_pool_url, self.cfg)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["tokenizer"], d["pool"] = None, None  # reloaded by setup() where the object is unpickled
        return d

    def __call__(self, samples: list[Sample], epoch: int) -> PretrainBatch:
        """Two stages, each over the whole batch: `text` (per-sample draws, tokens, text
        masking) and `regions` (region copy and masking, global region, locations). Every random
        number comes from the sample's own generator, drawn in a fixed order (negative, token
        masks, random ids, region masks)."""
        if self.tokenizer is None:
            self.setup()
        text = self.text(samples, epoch)
        vis = self.regions(samples, text.region_draws)
        if self.cfg.objective == 1:  # no masked modelling on misaligned pairs
            text.masked_lm_labels[text.is_next == 1] = -1
            vis.image_label[text.is_next == 1] = -1
        ids_t = torch.from_numpy(text.input_ids)
        return PretrainBatch(
            input_ids=ids_t, token_type_ids=torch.zeros_like(ids_t), attention_mask=torch.from_numpy(text.attention_mask),
            image_feat=vis.image_feat, image_loc=torch.from_numpy(vis.image_loc),
            image_mask=torch.from_numpy(vis.image_mask), keys=[s.key for s in samples],
            masked_lm_labels=torch.from_numpy(text.masked_lm_labels), image_label=torch.from_numpy(vis.image_label),
            image_target=vis.image_target, is_next=torch.from_numpy(text.is_next),
        )

    def text(self, samples: list[Sample], epoch: int) -> "TextPart":
        """Negatives, tokens and BERT masking of the batch, plus each image's region-mask draws
        (the last draws of its generator, used by `regions`)."""
        cfg = self.cfg
        B, R, T = len(samples), cfg.max_regions, cfg.max_seq_length - 2  # T: tokens between [CLS] and [SEP]
        rngs, captions = [], []
        is_next = np.zeros(B, dtype=np.int64) if cfg.objective != 2 else np.full(B, -1, dtype=np.int64)
        for i, s in enumerate(samples):
            rng = sample_rng(self.seed, epoch, s.key)
            caption = s.caption
            if caption is None:
                raise ValueError(f"{s.shard} key {s.key}: sample has no caption (pretraining needs one)")
            if cfg.objective != 2 and rng.random() > 0.5:
                caption = self.pool[int(rng.integers(len(self.pool)))]
                is_next[i] = 1
            rngs.append(rng)
            captions.append(caption)
        token_ids = self.tokenizer(captions, add_special_tokens=False)["input_ids"]
        n_tok = np.array([min(len(ids), T) for ids in token_ids], dtype=np.int64)  # [B]
        tokens = np.zeros((B, T), dtype=np.int64)
        p_tok = np.ones((B, T))  # padding never draws below mask_prob (and is excluded below)
        random_ids = np.zeros((B, T), dtype=np.int64)
        p_reg = np.ones((B, R))
        for i, (s, rng, ids) in enumerate(zip(samples, rngs, token_ids)):
            n, m = int(n_tok[i]), min(s.features.shape[0], R)
            tokens[i, :n] = ids[:n]
            p_tok[i, :n] = rng.random(n)
            random_ids[i, :n] = rng.integers(0, self.vocab_size, size=n)
            p_reg[i, :m] = rng.random(m)
        input_ids, attention, lm = self._mask_text(tokens, n_tok, p_tok, random_ids)
        return TextPart(input_ids=input_ids, attention_mask=attention, masked_lm_labels=lm, is_next=is_next,
                        region_draws=p_reg)

    def regions(self, samples: list[Sample], draws: np.ndarray) -> "RegionPart":
        """Region rows of the batch from the shard bytes (one copy), masked with `draws` [B, R]
        (each real region with draw < mask_prob is a target; 90% of the targets are zeroed),
        the global region (masked mean) and the locations."""
        cfg = self.cfg
        B, R = len(samples), cfg.max_regions
        D = samples[0].features.shape[1]
        C = (self.num_classes or (samples[0].cls_prob.shape[1] if samples[0].cls_prob is not None else D)) \
            if cfg.visual_target == 0 else D
        n_reg = np.array([min(s.features.shape[0], R) for s in samples], dtype=np.int64)  # [B]
        # the two large fields (~97% of the batch bytes); in a worker they go straight into
        # reusable shared memory (stream.BatchArena). Every element is written below.
        feat_t = batch_tensor((B, R + 1, D), torch.float16)
        target_t = batch_tensor((B, R, C), torch.float16)
        feat, target = feat_t.numpy(), target_t.numpy()
        boxes = np.zeros((B, R, 4), dtype=np.float32)
        size = np.ones((B, 2), dtype=np.float32)
        real = np.arange(R)[None, :] < n_reg[:, None]  # [B, R]
        chosen = (draws < cfg.mask_prob) & real  # [B, R]
        r = draws / cfg.mask_prob if cfg.mask_prob > 0 else draws
        zeroed = chosen & (r < 0.9)
        sums = torch.empty((B, D), dtype=torch.float32)  # float32 sum of each image's masked regions
        for i, s in enumerate(samples):
            self._copy_regions(s, int(n_reg[i]), feat[i], target[i], boxes[i], size[i])
            feat[i, 1:][zeroed[i]] = 0
            # summed while the image's rows are still in cache (a batched sum after the loop reads
            # the 4.8 MB batch back from memory); the same float32 additions in the same order
            torch.sum(feat_t[i, 1:], 0, dtype=torch.float32, out=sums[i])
        # locations (x1/W, y1/H, x2/W, y2/H, area/(W*H)), global region (0, 0, 1, 1, 1)
        w, h = size[:, 0:1], size[:, 1:2]
        loc = np.zeros((B, R + 1, 5), dtype=np.float32)
        loc[:, 0] = (0, 0, 1, 1, 1)
        loc[:, 1:, 0], loc[:, 1:, 1] = boxes[..., 0] / w, boxes[..., 1] / h
        loc[:, 1:, 2], loc[:, 1:, 3] = boxes[..., 2] / w, boxes[..., 3] / h
        loc[:, 1:, 4] = (boxes[..., 3] - boxes[..., 1]) * (boxes[..., 2] - boxes[..., 0]) / (w * h)
        loc[:, 1:][~real] = 0
        # overlap set: real regions with IoU > 0.4 to a masked one (incl. itself); it only
        # shrinks the global region's denominator, as in the original
        overlap = masked_overlap(boxes, chosen) & real
        denom = np.maximum(1, n_reg - overlap.sum(axis=1)).astype(np.float32)
        # global region: float32 sum of the (masked) float16 regions (padding rows are zero)
        feat_t[:, 0] = (sums / torch.from_numpy(denom)[:, None]).to(torch.float16)
        image_mask = np.zeros((B, R + 1), dtype=np.int64)
        image_mask[:, 0] = 1
        image_mask[:, 1:] = real
        return RegionPart(image_feat=feat_t, image_target=target_t, image_loc=loc, image_mask=image_mask,
                          image_label=np.where(chosen, 1, -1).astype(np.int64))

    def _mask_text(self, tokens: np.ndarray, n_tok: np.ndarray, p: np.ndarray, random_ids: np.ndarray):
        """BERT masking of the whole batch: tokens [B, T] (0-padded after n_tok [B]), their draws
        p [B, T] and random replacement ids [B, T] -> (input_ids, attention_mask,
        masked_lm_labels), each [B, T + 2]: [CLS] masked tokens [SEP] padding; labels are the
        original ids of the targets, else -1."""
        mask_prob = self.cfg.mask_prob
        B, T = tokens.shape
        is_token = np.arange(T)[None, :] < n_tok[:, None]
        chosen = (p < mask_prob) & is_token
        r = p / mask_prob if mask_prob > 0 else p
        out = tokens.copy()  # padding stays 0
        out[chosen & (r < 0.8)] = self.mask_id
        swap = chosen & (r >= 0.8) & (r < 0.9)
        out[swap] = random_ids[swap]
        input_ids = np.zeros((B, T + 2), dtype=np.int64)
        input_ids[:, 0] = self.cls_id
        input_ids[:, 1:T + 1] = out
        input_ids[np.arange(B), n_tok + 1] = self.sep_id
        attention = (np.arange(T + 2)[None, :] < (n_tok + 2)[:, None]).astype(np.int64)
        lm = np.full((B, T + 2), -1, dtype=np.int64)
        lm[:, 1:T + 1] = np.where(chosen, tokens, -1)
        return input_ids, attention, lm

    def _copy_regions(self, s: Sample, n: int, feat: np.ndarray, target: np.ndarray, boxes: np.ndarray,
                      size: np.ndarray) -> None:
        """Copies one image's first n regions from the shard bytes into its batch rows: feat
        [R+1, D] rows 1..n (row 0 is the global region, written later), target [R, C], boxes
        [R, 4], size [2] (w, h); padding rows are zeroed (the tensors are allocated empty)."""
        feat[1:n + 1] = s.features[:n]
        feat[n + 1:] = 0
        if self.cfg.visual_target == 0:
            if s.cls_prob is None:
                raise ValueError(f"{s.shard} key {s.key}: no cls_prob member; visual_target 0 (KL) needs it "
                                 f"(set data.visual_target=1 for feature regression)")
            target[:n] = s.cls_prob[:n]
        else:
            target[:n] = s.features[:n]  # the unmasked features
        target[n:] = 0
        boxes[:n] = s.boxes[:n]
        size[0], size[1] = s.meta["image_w"], s.meta["image_h"]


def masked_overlap(boxes: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """[B, R] bool: regions whose IoU with a chosen (masked) region of the same image exceeds
    OVERLAP_IOU, the chosen ones included. boxes [B, R, 4] absolute x1y1x2y2 (float32, +1 pixel
    convention), chosen [B, R] bool. Only the chosen rows of each image's IoU matrix are
    computed (~15% of them), with the same float32 arithmetic as the full matrix."""
    out = np.zeros(chosen.shape, dtype=bool)
    b, r = np.nonzero(chosen)  # row-major: grouped by image
    if len(b) == 0:
        return out
    x1, y1, x2, y2 = (boxes[..., k] for k in range(4))  # [B, R] each
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    iw = np.minimum(x2[b, r][:, None], x2[b]) - np.maximum(x1[b, r][:, None], x1[b]) + 1  # [K, R]
    ih = np.minimum(y2[b, r][:, None], y2[b]) - np.maximum(y1[b, r][:, None], y1[b]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    hit = inter / (area[b, r][:, None] + area[b] - inter) > OVERLAP_IOU
    first = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])  # first chosen row of each image
    out[b[first]] = np.logical_or.reduceat(hit, first, axis=0)
    return out


def load_caption_pool(url: str | None, cfg: DataConfig) -> list[str]:
    """The negatives pool: a JSON list of captions or `{image_id: caption}` (values, in order)."""
    if not url:
        raise ValueError("no caption pool for negative captions: the manifest names none; set data.caption_pool "
                         "(JSON list or {image_id: caption}) or use data.objective=2")
    d = json.loads(storage.read_bytes(url, cfg.storage_options, retries=cfg.max_retries, backoff_s=cfg.retry_backoff_s))
    pool = list(d.values()) if isinstance(d, dict) else list(d)
    if not pool:
        raise ValueError(f"{storage.safe_url(url)}: caption pool is empty")
    return [str(c) for c in pool]


def read_options(cfg: DataConfig, manifests: list[Manifest]) -> ReadOptions:
    dims = {m.feature_dim for m in manifests}
    if len(dims) != 1:
        raise ValueError(f"data sources mix feature dims {sorted(dims)}")
    classes = {m.num_classes for m in manifests}
    return ReadOptions(storage_options=cfg.storage_options, chunk_bytes=cfg.read_chunk_bytes,
                       parallel=max(1, cfg.readahead_chunks), retries=cfg.max_retries, backoff_s=cfg.retry_backoff_s,
                       on_error=cfg.on_error, feature_dim=dims.pop(), num_classes=classes.pop() if len(classes) == 1 else None)


def load_sources(cfg: DataConfig, split: str) -> list[Source]:
    retry = dict(retries=cfg.max_retries, backoff_s=cfg.retry_backoff_s)
    return [Source(manifest=load_source(s.url, cfg.storage_options, **retry), weight=s.weight) for s in cfg.sources(split)]


def build_pretrain_loader(cfg: DataConfig, *, split: str = "train", rank: int, world_size: int,
                          micro_batch_size: int, seed: int, local_world_size: int = 1) -> StreamingLoader:
    """The pretraining Loader of one rank (see `stream.StreamingLoader` for the protocol).
    `local_world_size`: ranks per node, those that share `data.cache_dir` (the training split)."""
    sources = load_sources(cfg, split)
    manifests = [s.manifest for s in sources]
    pool = cfg.caption_pool or next((m.caption_pool for m in manifests if m.caption_pool), None)
    collate = PretrainCollate(cfg, seed, pool, manifests[0].num_classes)
    # load tokenizer and caption pool once here: forked workers inherit them (no per-worker,
    # per-epoch reload), and a wrong vocab path or a missing pool fails before any worker starts
    collate.setup()
    train = split == "train"
    return StreamingLoader(
        sources, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size, seed=seed, make_batch=collate,
        num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor, pin_memory=cfg.pin_memory,
        shuffle=cfg.shuffle and train, shuffle_buffer=cfg.shuffle_buffer, resampled=cfg.resampled and train,
        epoch_samples=cfg.epoch_samples if train else None, read=read_options(cfg, manifests), name=split,
        cache=CacheSpec(cfg.cache_dir, cfg.cache_bytes) if cfg.cache_dir and train else None,
        ranks_per_node=cfg.cache_ranks_per_node or local_world_size,
    )
