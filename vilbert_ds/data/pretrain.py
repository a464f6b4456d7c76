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

import inspect
import json
import logging
import os

import numpy as np
import torch

from . import storage
from .batch import PretrainBatch
from .config import DataConfig
from .manifest import Manifest, load_source
from .sample import Sample
from .stream import ReadOptions, Source, StreamingLoader, sample_rng

log = logging.getLogger(__name__)

OVERLAP_IOU = 0.4  # regions overlapping a masked one above this IoU leave the global-mean denominator


def load_tokenizer(vocab: str):
    """Uncased WordPiece `BertTokenizerFast` from a vocab.txt or a tokenizer directory (local only)."""
    from transformers import BertTokenizerFast

    if not vocab:
        raise ValueError("data.vocab: path of a vocab.txt or tokenizer directory is required")
    if os.path.isdir(vocab):
        if os.path.exists(os.path.join(vocab, "tokenizer.json")) or os.path.exists(os.path.join(vocab, "tokenizer_config.json")):
            return BertTokenizerFast.from_pretrained(vocab, local_files_only=True)
        vocab = os.path.join(vocab, "vocab.txt")
    if not os.path.isfile(vocab):
        raise ValueError(f"data.vocab: {vocab} does not exist")
    params = inspect.signature(BertTokenizerFast.__init__).parameters
    key = "vocab" if "vocab" in params else "vocab_file"  # transformers 5 renamed vocab_file
    return BertTokenizerFast(**{key: vocab}, do_lower_case=True)


def iou_matrix(boxes: np.ndarray) -> np.ndarray:
    """[N, N] IoU of absolute x1y1x2y2 boxes with the original's +1 pixel convention."""
    b = boxes.astype(np.float64)
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    iw = np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0]) + 1
    ih = np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    return inter / (area[:, None] + area[None, :] - inter)


class PretrainCollate:
    """(samples, epoch) -> PretrainBatch. Picklable; `setup()` loads the tokenizer and caption
    pool inside the worker process."""

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
        d["tokenizer"], d["pool"] = None, None  # reloaded in each worker
        return d

    # -- per sample ------------------------------------------------------------------------------
    def _text(self, ids: list[int], rng: np.random.Generator):
        cfg = self.cfg
        ids = ids[: cfg.max_seq_length - 2]
        n = len(ids)
        tokens = np.asarray(ids, dtype=np.int64)
        labels = np.full(n, -1, dtype=np.int64)
        p = rng.random(n)
        chosen = p < cfg.mask_prob
        r = p / cfg.mask_prob if cfg.mask_prob > 0 else p
        random_ids = rng.integers(0, self.vocab_size, size=n)
        labels[chosen] = tokens[chosen]
        out = tokens.copy()
        out[chosen & (r < 0.8)] = self.mask_id
        swap = chosen & (r >= 0.8) & (r < 0.9)
        out[swap] = random_ids[swap]
        L = cfg.max_seq_length
        input_ids = np.zeros(L, dtype=np.int64)
        lm = np.full(L, -1, dtype=np.int64)
        input_ids[0], input_ids[1:n + 1], input_ids[n + 1] = self.cls_id, out, self.sep_id
        lm[1:n + 1] = labels
        mask = np.zeros(L, dtype=np.int64)
        mask[: n + 2] = 1
        return input_ids, mask, lm

    def _regions(self, s: Sample, rng: np.random.Generator):
        cfg = self.cfg
        R = cfg.max_regions
        n = min(s.features.shape[0], R)
        feats = np.zeros((R, s.features.shape[1]), dtype=np.float32)
        feats[:n] = s.features[:n]
        boxes = s.boxes[:n]
        w, h = float(s.meta["image_w"]), float(s.meta["image_h"])
        loc = np.zeros((R, 5), dtype=np.float32)
        loc[:n, 0], loc[:n, 1] = boxes[:, 0] / w, boxes[:, 1] / h
        loc[:n, 2], loc[:n, 3] = boxes[:, 2] / w, boxes[:, 3] / h
        loc[:n, 4] = (boxes[:, 3] - boxes[:, 1]) * (boxes[:, 2] - boxes[:, 0]) / (w * h)
        if cfg.visual_target == 0:
            if s.cls_prob is None:
                raise ValueError(f"{s.shard} key {s.key}: no cls_prob member; visual_target 0 (KL) needs it "
                                 f"(set data.visual_target=1 for feature regression)")
            target = np.zeros((R, s.cls_prob.shape[1]), dtype=np.float16)
            target[:n] = s.cls_prob[:n]
        else:
            target = feats.astype(np.float16)  # the unmasked features
        p = rng.random(n)
        chosen = p < cfg.mask_prob
        r = p / cfg.mask_prob if cfg.mask_prob > 0 else p
        feats[:n][chosen & (r < 0.9)] = 0.0
        label = np.full(R, -1, dtype=np.int64)
        label[:n][chosen] = 1
        overlap = np.zeros(n, dtype=bool)
        if chosen.any():
            overlap = (iou_matrix(boxes)[chosen] > OVERLAP_IOU).any(axis=0)
        denom = max(1, n - int(overlap.sum()))
        global_feat = feats.sum(axis=0) / denom
        image_mask = np.zeros(R + 1, dtype=np.int64)
        image_mask[: n + 1] = 1
        feat_all = np.concatenate([global_feat[None], feats], axis=0)
        loc_all = np.concatenate([np.array([[0, 0, 1, 1, 1]], dtype=np.float32), loc], axis=0)
        return feat_all.astype(np.float16), loc_all, image_mask, label, target

    def __call__(self, samples: list[Sample], epoch: int) -> PretrainBatch:
        if self.tokenizer is None:
            self.setup()
        cfg = self.cfg
        rngs, captions, is_next = [], [], []
        for s in samples:
            rng = sample_rng(self.seed, epoch, s.key)
            caption = s.caption
            if caption is None:
                raise ValueError(f"{s.shard} key {s.key}: sample has no caption (pretraining needs one)")
            label = 0
            if cfg.objective != 2 and rng.random() > 0.5:
                caption = self.pool[int(rng.integers(len(self.pool)))]
                label = 1
            rngs.append(rng)
            captions.append(caption)
            is_next.append(label if cfg.objective != 2 else -1)
        token_ids = self.tokenizer(captions, add_special_tokens=False)["input_ids"]
        cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                             ("ids", "mask", "lm", "feat", "loc", "imask", "ilabel", "target")}
        for s, rng, ids, nxt in zip(samples, rngs, token_ids, is_next):
            input_ids, mask, lm = self._text(ids, rng)
            feat, loc, imask, ilabel, target = self._regions(s, rng)
            if cfg.objective == 1 and nxt == 1:
                lm[:] = -1
                ilabel[:] = -1
            for k, v in zip(cols, (input_ids, mask, lm, feat, loc, imask, ilabel, target)):
                cols[k].append(v)
        t = {k: torch.from_numpy(np.stack(v)) for k, v in cols.items()}
        return PretrainBatch(
            input_ids=t["ids"], token_type_ids=torch.zeros_like(t["ids"]), attention_mask=t["mask"],
            image_feat=t["feat"], image_loc=t["loc"], image_mask=t["imask"], keys=[s.key for s in samples],
            masked_lm_labels=t["lm"], image_label=t["ilabel"], image_target=t["target"],
            is_next=torch.tensor(is_next, dtype=torch.int64),
        )


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
                          micro_batch_size: int, seed: int) -> StreamingLoader:
    """The pretraining Loader of one rank (see `stream.StreamingLoader` for the protocol)."""
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
        shuffle=cfg.shuffle and train, shuffle_bytes=cfg.shuffle_bytes, resampled=cfg.resampled and train,
        epoch_samples=cfg.epoch_samples if train else None, read=read_options(cfg, manifests), name=split,
    )
