"""VL-logit retrieval: caption <-> image retrieval on COCO and Flickr30k (Karpathy splits).

One example per caption (image joined in). Two ways to score:

Training and the per-step validation score (the original `RetreivalDataset`): each caption
becomes 4 model rows:
  1. the true pair (target index 0);
  2. the same image + a random caption of a random other image of the split;
  3. a random other image of the split + the same caption;
  4. training split: the same image + a caption of a *hard-negative* image (drawn from the
     image's pool); other splits: a caption of a random other image.
`vil_logit` [4B, 1] is reshaped to [B, 4]; loss = cross-entropy with target 0; score = 4-way
accuracy (ties count as wrong: the answer is always option 0, which torch.max picks on ties).
"Random" is over the WHOLE split, as the original draws: each split has a negatives index
(`negatives.npz` beside its manifest, `SplitNegatives`): every image, its captions (UTF-8 bytes)
and the position of a sample of each caption in the set, plus the hard-negative pools of the
training split. A data worker loads it once; option 2 and 4 captions come from it, option 3's
image is one random-access read of another sample of the set (`data.stream.read_samples` at
the manifest's byte offsets). Per worker that is the index in memory (COCO train: ~100 MB,
45 MB of it the 100-image pools) and one extra sample read per example. Draws come
from the example's (seed, epoch, key) generator, so a resumed run draws the same negatives.
Unlike the original, option 3 never keeps stale boxes of the true image.

Hard negatives (the pool of an image: the images whose option-4 captions it gets):
- the original's model-mined `hard_negative_cleaned.pkl` (clean_train_sets on) /
  `hard_negative.pkl` in the task's `released` directory ({"train_image_list", "train_hard_pool":
  [images, 100] nearest images, itself first}; read by the restricted unpickler, numeric arrays
  only); a training image it lacks gets a TF-IDF pool (counted in the log);
- `options.hard_negatives_file`: JSON `{image_id: [image ids, most similar first]}`;
- otherwise (logged): the `hard_negative_pool` images whose captions are most similar by TF-IDF
  cosine.

Ranking evaluation (`evaluate_ranking`, the original `eval_retrieval.py`), two protocols:
- `full` (default): every caption of the split against every image of the split, R@1/5/10 in
  both directions (caption->image and image->caption), median and mean rank;
- `paper` (`vilbert-ds eval --protocol paper`): the published numbers' protocol: caption->image
  only, on the 1k test images (COCO: set 0 = the first 1,000 test images in the Karpathy file
  order, the images of the original's `all_data_final_test_set0_2014.jsonline`; Flickr30k: its
  1,000 test images), the first 5 captions of each image (the released file's captions when
  given), R@1/5/10, median rank (floor of the median, as the original) and mean rank. The set is
  stored in `assets.json` ("paper_protocol") at build time.
The text batch of 1 is broadcast over a chunk of images inside the model (`ViLBert` fast mode).
`zero_shot=True` scores with the *pretraining* alignment head (`seq_relationship`, softmax index
0 = aligned) and no task token, so a pretrained checkpoint without task heads can be evaluated
(the original's `--zero_shot` path crashes). Distributed: each rank keeps the images of its
share of the split, captions are all-gathered (small), each rank scores all captions against its
images, and the per-image score columns are merged by image id, so the duplicates of padded last
batches count once. Ties count against the gold item (the original's argsort breaks them by
position).

Public format: Karpathy's split files in the task's `annotations` directory, `dataset_coco.json`
/ `dataset_flickr30k.json` = `{"images": [{split (train/val/test/restval), filename, cocoid (COCO),
sentences: [{sentid, raw}]}]}`. Image ids: COCO `cocoid`, Flickr30k the file name without
extension. COCO's `restval` joins the training split (`options.restval_in_train`). `eval_images`
> 0 keeps the first N images of the evaluation splits (a smaller full-protocol ranking).
Prediction files (no public server): 4-way records `[{"sent_id", "correct"}]`; ranking
`{"text_to_image": [{"sent_id", "image_ids": top 10}], "image_to_text": [{"image_id", "sent_ids": top 10}]}`
(paper protocol: `text_to_image` only).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import storage
from ..data.manifest import load_source
from ..data.sample import Sample
from ..data.stream import ReadOptions, StreamStats, read_samples
from .base import TaskBatch, TaskExample, TaskFamily, collate_rows, describe_asset_source, join_path, pad_stack, read_json
from .metrics import TaskMetric, _sort_key, rank_of_gold, recall_at_k
from .loader import sample_dict
from .released import load_hard_negative_pool, released_source

log = logging.getLogger(__name__)

NUM_OPTIONS = 4  # true pair, random caption, random image, hard-negative caption
NEGATIVES_NAME = "negatives.npz"  # the split's negatives index, beside its manifest.json
PAPER_IMAGES = 1000  # the paper protocol's test set: COCO 1k set 0, Flickr30k 1k
PAPER_CAPTIONS = 5  # captions per image in the paper protocol (5,000 captions x 1,000 images)
PAPER_TEST_FILE = "all_data_final_test_set0_2014.jsonline"  # the original's 1k test set
_WORD = re.compile(r"[a-z0-9]+")


@dataclass
class RetrievalBatch(TaskBatch):
    """4 consecutive rows per caption (see the module docstring); rows 4i are the true pairs
    (1 row per caption while a ranking evaluation reads the split)."""

    label: torch.Tensor | None = None  # [B] int64, index of the true pair among the 4 options (0)
    image_ids: list[str] = field(default_factory=list)  # per caption
    sent_ids: list[str] = field(default_factory=list)  # per caption


# ------------------------------------------------------------------------------ hard negatives
def tfidf_neighbours(texts: Mapping[str, str], pool: int, chunk: int = 256) -> dict[str, list[str]]:
    """{id: text} -> {id: the `pool` other ids with the most similar text (TF-IDF cosine), best first}.

    Sparse X [N, V] (L2-normalised TF-IDF rows) times dense column chunks of X^T: memory is
    O(N * chunk), time O(nnz(X) * N / chunk * chunk)."""
    ids = list(texts)
    n = len(ids)
    pool = min(pool, n - 1)
    if pool < 1:
        return {i: [] for i in ids}
    docs = [Counter(_WORD.findall(texts[i].lower())) for i in ids]
    df: Counter[str] = Counter()
    for d in docs:
        df.update(d.keys())
    vocab = {w: k for k, w in enumerate(sorted(df))}
    idf = {w: math.log((1 + n) / (1 + c)) + 1.0 for w, c in df.items()}
    rows, cols, vals = [], [], []
    for r, d in enumerate(docs):
        weights = {w: c * idf[w] for w, c in d.items()}
        norm = math.sqrt(sum(v * v for v in weights.values())) or 1.0
        for w, v in weights.items():
            rows.append(r)
            cols.append(vocab[w])
            vals.append(v / norm)
    x = torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.int64), torch.tensor(vals, dtype=torch.float32),
                                (n, max(len(vocab), 1)), check_invariants=True).coalesce()
    out: dict[str, list[str]] = {}
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        dense = _dense_rows(x, start, end)
        sims = torch.sparse.mm(x, dense.T.contiguous())  # [N, c]
        sims[torch.arange(start, end), torch.arange(end - start)] = -math.inf  # never yourself
        # ties broken by id order (stable sort), so the pool is deterministic
        order = torch.sort(-sims, dim=0, stable=True).indices[:pool].T
        for k, neighbours in enumerate(order.tolist()):
            out[ids[start + k]] = [ids[j] for j in neighbours]
    return out


def _dense_rows(x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    idx = x.indices()
    keep = (idx[0] >= start) & (idx[0] < end)
    dense = torch.zeros(end - start, x.size(1), dtype=x.dtype)
    dense[idx[0, keep] - start, idx[1, keep]] = x.values()[keep]
    return dense


def strictly_correct(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """logits [B, K], label [B] -> [B] bool: the labelled option scores strictly above every other.

    Ties count as wrong (torch.max would pick the first option, so a collapsed model that gives
    every option the same logit would score 100% on retrieval, whose answer is always option 0)."""
    safe = label.clamp(min=0)
    gold = logits.gather(1, safe[:, None])
    others = logits.scatter(1, safe[:, None], float("-inf"))
    return (gold[:, 0] > others.max(dim=1).values) & (label >= 0)


# ------------------------------------------------------------------------------ negatives index
class SplitNegatives:
    """Random access to a whole split for drawing negatives (module docstring): images [I] (ids
    in set order of first appearance), captions grouped by image (image i owns captions
    `image_captions[i]:image_captions[i+1]`; text = `caption_text[caption_offsets[c]:...+1]`
    UTF-8), `caption_sample` [C] (position of the caption's sample in the split's manifest
    order), `hard_pool` [I, P] int32 (indices of pool images, -1 = none; absent outside the
    training split)."""

    ARRAYS = ("images", "caption_text", "caption_offsets", "image_captions", "caption_sample", "hard_pool")

    def __init__(self, arrays: Mapping[str, np.ndarray], split_dir: str = ""):
        for name in self.ARRAYS:
            setattr(self, name, arrays[name])
        self.split_dir = split_dir
        self.index = {str(img): i for i, img in enumerate(self.images.tolist())}
        self._reader = None
        if len(self.images) < 2:
            raise ValueError(f"{split_dir}: {len(self.images)} image(s) in the split; negatives need >= 2")

    @staticmethod
    def arrays(examples: Sequence[TaskExample], pools: Mapping[str, Sequence[str]] | None,
               pool_size: int) -> dict[str, np.ndarray]:
        """The index arrays of a split's examples (in set order) and image -> pool image ids."""
        order: dict[str, list[int]] = {}
        for pos, ex in enumerate(examples):
            order.setdefault(str(ex.payload["image_id"]), []).append(pos)
        images = list(order)
        text, offsets, starts, positions = bytearray(), [0], [0], []
        for img in images:
            for pos in order[img]:
                text += examples[pos].payload["caption"].encode("utf-8")
                offsets.append(len(text))
                positions.append(pos)
            starts.append(len(positions))
        at = {img: i for i, img in enumerate(images)}
        if pools:
            width = max(1, min(pool_size, max((len(v) for v in pools.values()), default=1)))
            hard = np.full((len(images), width), -1, dtype=np.int32)
            for img, i in at.items():
                row = [at[j] for j in pools.get(img, ()) if j in at and j != img][:width]
                hard[i, : len(row)] = row
        else:
            hard = np.zeros((len(images), 0), dtype=np.int32)
        return {"images": np.asarray(images, dtype=str), "caption_text": np.frombuffer(bytes(text), dtype=np.uint8),
                "caption_offsets": np.asarray(offsets, dtype=np.int64), "image_captions": np.asarray(starts, dtype=np.int64),
                "caption_sample": np.asarray(positions, dtype=np.int64), "hard_pool": hard}

    @classmethod
    def load(cls, split_dir: str) -> "SplitNegatives":
        url = join_path(split_dir, NEGATIVES_NAME)
        try:
            data = storage.read_bytes(url)
        except FileNotFoundError:
            raise FileNotFoundError(f"{url} is missing: rebuild the retrieval task shards (vilbert-ds shards task) to "
                                    f"get the negatives index") from None
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return cls({name: npz[name] for name in cls.ARRAYS}, split_dir)

    def caption(self, c: int) -> str:
        return bytes(self.caption_text[self.caption_offsets[c]:self.caption_offsets[c + 1]]).decode("utf-8")

    def image_of(self, image_id: str) -> int:
        if image_id not in self.index:
            raise KeyError(f"{self.split_dir}/{NEGATIVES_NAME}: image {image_id} is not in the index (rebuild the shards)")
        return self.index[image_id]

    def other_image(self, rng: np.random.Generator, i: int) -> int:
        """A uniformly random image of the split other than image i (the original's rejection loop)."""
        j = int(rng.integers(len(self.images) - 1))
        return j + (j >= i)

    def hard_image(self, rng: np.random.Generator, i: int) -> int:
        """A uniformly random image of image i's hard-negative pool (a random other image if empty)."""
        row = self.hard_pool[i]
        row = row[row >= 0]
        return int(row[int(rng.integers(len(row)))]) if len(row) else self.other_image(rng, i)

    def random_caption(self, rng: np.random.Generator, image: int) -> int:
        lo, hi = int(self.image_captions[image]), int(self.image_captions[image + 1])
        return lo + int(rng.integers(hi - lo))

    def sample_at(self, position: int):
        """The set's sample at a position (manifest order): one ranged read."""
        if self._reader is None:
            manifest = load_source(join_path(self.split_dir, "manifest.json"))
            opts = ReadOptions(storage_options={}, chunk_bytes=8 << 20, parallel=1, retries=6, backoff_s=0.25,
                               on_error="fail", feature_dim=manifest.feature_dim, num_classes=manifest.num_classes)
            self._reader = (manifest, np.cumsum([0] + [sh.count for sh in manifest.shards]), opts)
        manifest, starts, opts = self._reader
        shard = int(np.searchsorted(starts, position, side="right") - 1)
        local = position - int(starts[shard])
        return read_samples(manifest.shards[shard], [local], opts, StreamStats(), set())[local]


# ------------------------------------------------------------------------------ ranking metric
class RankingMetric(TaskMetric):
    """Caption x image scores: `captions` ([(sent_id, image_id)], the same order on every rank)
    and one score column [C] per image. `update({image_id: {"scores": [C]}})` adds columns (the
    first copy of an image wins, so padded repeats count once); `records` hold a placeholder per
    image. `gather()` all-gathers the columns as tensors (not pickled floats: a 5k x 25k COCO
    ranking is 125M scores)."""

    def __init__(self, task: str, captions: Sequence[tuple[str, str]] = (), protocol: str = "full"):
        super().__init__(task)
        self.captions = [(str(s), str(i)) for s, i in captions]
        self.columns: dict[str, torch.Tensor] = {}
        self.protocol = protocol  # "full": both directions; "paper": caption->image, the original's median
        self.note = ""  # what was ranked, for logs and the metrics file (set by evaluate_ranking)

    def update(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        for image, record in records.items():
            image = str(image)
            if image in self.columns:
                continue
            column = torch.as_tensor(record["scores"], dtype=torch.float32).flatten().cpu()
            if column.numel() != len(self.captions):
                raise ValueError(f"task {self.task}: image {image} has {column.numel()} caption scores, "
                                 f"{len(self.captions)} captions")
            self.columns[image] = column
            self.records[image] = {"score": None}

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task, "captions": self.captions, "protocol": self.protocol,
                "records": {img: {"score": None, "scores": col.tolist()} for img, col in self.columns.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.captions = [(str(s), str(i)) for s, i in state["captions"]]
        self.protocol = state.get("protocol", "full")
        self.records, self.columns = {}, {}
        self.update(state["records"])

    def gather(self) -> "RankingMetric":
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        images = sorted(self.columns, key=_sort_key)
        ids: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ids, images)
        width = max(len(i) for i in ids)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        local = torch.zeros(len(self.captions), width, device=device)
        if images:
            local[:, : len(images)] = torch.stack([self.columns[i] for i in images], dim=1).to(device)
        parts = [torch.empty_like(local) for _ in ids]
        dist.all_gather(parts, local)
        merged = RankingMetric(self.task, self.captions, self.protocol)
        merged.note = self.note
        for part_ids, part in zip(ids, parts):
            part = part.cpu()
            merged.update({img: {"scores": part[:, k]} for k, img in enumerate(part_ids)})
        return merged

    def matrix(self, records: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """(scores [C, I] float32, image ids [I] sorted, gold image index per caption [C])."""
        images = sorted(self.records if records is None else records, key=_sort_key)
        column = {img: k for k, img in enumerate(images)}
        missing = sorted({img for _, img in self.captions if img not in column})
        if missing:
            raise ValueError(f"task {self.task}: ranking has captions of images {missing[:5]} that no rank scored")
        if not images:
            return torch.zeros(len(self.captions), 0), images, torch.zeros(0, dtype=torch.int64)
        scores = torch.stack([self.columns[img] for img in images], dim=1)
        gold = torch.tensor([column[img] for _, img in self.captions], dtype=torch.int64)
        return scores, images, gold

    def summarize(self, records: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
        scores, images, gold = self.matrix(records)
        if self.protocol == "paper":
            return paper_summary(rank_of_gold(scores, gold), len(images))
        t2i = recall_at_k(rank_of_gold(scores, gold))
        i2t = recall_at_k(image_to_text_ranks(scores, gold))
        out = {f"t2i_{k}": v for k, v in t2i.items()} | {f"i2t_{k}": v for k, v in i2t.items()}
        out["rsum"] = sum(out[f"{d}_R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10))
        out["score"] = out["t2i_R@1"] / 100.0
        out["captions"], out["images"] = float(len(self.captions)), float(len(images))
        out["count"] = out["captions"]  # examples scored, as TaskMetric's result has it
        return out

    def rankings(self, top: int = 10) -> dict[str, list[dict[str, Any]]]:
        scores, images, _ = self.matrix()
        k_img, k_cap = min(top, len(images)), min(top, len(self.captions))
        if self.protocol == "paper":
            k_cap = 0
        t2i = scores.topk(k_img, dim=1).indices.tolist() if k_img else [[] for _ in self.captions]
        i2t = scores.T.topk(k_cap, dim=1).indices.tolist() if k_cap else [[] for _ in images]
        out = {"text_to_image": [{"sent_id": _id(s), "image_ids": [_id(images[j]) for j in row]}
                                 for (s, _), row in zip(self.captions, t2i)]}
        if self.protocol != "paper":
            out["image_to_text"] = [{"image_id": _id(img), "sent_ids": [_id(self.captions[j][0]) for j in row]}
                                    for img, row in zip(images, i2t)]
        return out


def paper_summary(ranks: torch.Tensor, num_images: int) -> dict[str, float]:
    """The original `eval_retrieval.py` numbers from 1-based caption->image ranks [C]: R@1/5/10 (%),
    median rank = floor of the (numpy, averaging) median, mean rank."""
    r = ranks.double().numpy()
    out = {f"t2i_R@{k}": float((r <= k).mean() * 100.0) if len(r) else 0.0 for k in (1, 5, 10)}
    out["t2i_median_rank"] = float(np.floor(np.median(r))) if len(r) else 0.0
    out["t2i_mean_rank"] = float(r.mean()) if len(r) else 0.0
    out["score"] = out["t2i_R@1"] / 100.0
    out["captions"] = out["count"] = float(len(r))
    out["images"] = float(num_images)
    return out


def _id(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def image_to_text_ranks(scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """scores [C, I], gold image per caption [C] -> [I] 1-based rank of each image's best-ranked
    gold caption among all captions (ties count against the gold caption)."""
    num_images = scores.size(1)
    ranks = torch.zeros(num_images, dtype=torch.int64)
    for i in range(num_images):
        column = scores[:, i]
        mine = gold == i
        if not bool(mine.any()):
            raise ValueError(f"image column {i} has no gold caption")
        best = column[mine].max()
        ranks[i] = (column >= best).sum()
    return ranks


# ------------------------------------------------------------------------------ family
class RetrievalFamily(TaskFamily):
    family = "retrieval"
    formats = ("coco", "flickr30k")
    heads = ("vil_logit",)
    batch_type = RetrievalBatch

    @dataclass
    class Options:
        restval_in_train: bool = True  # COCO Karpathy `restval` images join the training split
        hard_negative_pool: int = 100  # similar images per training image to draw hard negatives from
        hard_negatives_file: str = ""  # JSON {image_id: [similar image ids]}; empty = released pool or TF-IDF
        eval_images: int = 0  # >0: keep the first N images of non-training splits (full-protocol ranking)
        image_chunk: int = 500  # images per forward in ranking evaluation (the original: 500)

        def __post_init__(self) -> None:
            for key in ("hard_negative_pool", "image_chunk"):
                if int(getattr(self, key)) < 1:
                    raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
            if self.eval_images < 0:
                raise ValueError(f"eval_images={self.eval_images} must be >= 0 (0 = all)")

    def __init__(self, config, tokenizer=None):
        super().__init__(config, tokenizer)
        self._negatives: dict[str, SplitNegatives] = {}  # per split, loaded once per process
        self._pools: dict[str, dict[str, list[str]]] = {}  # build time: hard-negative pools per split
        self._true_pairs_only = False  # a ranking evaluation reads the split: no negatives drawn

    # ------------------------------------------------------------------ annotations
    @property
    def annotation_file(self) -> str:
        return join_path(self.config.annotations, f"dataset_{self.config.format}.json")

    def image_id(self, img: Mapping[str, Any]) -> str:
        return str(img["cocoid"]) if self.config.format == "coco" else Path(str(img["filename"])).stem

    def read_annotations(self, split: str) -> list[TaskExample]:
        path = self.annotation_file
        data = read_json(path)
        train = split == self.config.splits.train
        wanted = {split} | ({"restval"} if train and self.options.restval_in_train else set())
        found = sorted({str(img.get("split")) for img in data["images"]})
        if not wanted & set(found):
            raise ValueError(f"task {self.name!r}: {path} has no images of split {split!r}; its splits: {found}")
        out: list[TaskExample] = []
        images = 0
        for img in data["images"]:
            if str(img.get("split")) not in wanted:
                continue
            if not train and self.options.eval_images and images >= self.options.eval_images:
                break
            images += 1
            image = self.image_id(img)
            for sent in img["sentences"]:
                payload = {"sent_id": str(sent["sentid"]), "image_id": image, "caption": sent["raw"]}
                out.append(TaskExample(str(sent["sentid"]), {"": image}, payload))
        return out

    # ------------------------------------------------------------------ assets: the paper protocol's test set
    @property
    def released_test_file(self) -> str:
        return join_path(self.config.released, PAPER_TEST_FILE) if self.config.released else ""

    def asset_source(self) -> dict[str, Any]:
        if self.released_test_file and storage.exists(self.released_test_file):
            return released_source(self.released_test_file)
        return {"kind": "derived", "paper_images": PAPER_IMAGES}

    def build_assets(self, train_examples: Sequence[TaskExample]) -> dict[str, Any]:
        """{"paper_protocol": {"split", "images": [ids in order], "captions_per_image": [n]}}:
        the original's 1k test set file when released, else the first 1,000 test images of the
        Karpathy file (COCO set 0; all 1,000 of Flickr30k)."""
        split = self.config.splits.test[0] if self.config.splits.test else self.config.splits.val
        if self.asset_source()["kind"] == "released":
            path = self.released_test_file
            images, counts = [], []
            with storage.open_url(path, "rb") as f:
                for n, line in enumerate(f.read().decode("utf-8").splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        image = str(row["id"]) if self.config.format == "coco" else Path(str(row["img_path"])).stem
                        counts.append(len(row["sentences"]))
                    except (json.JSONDecodeError, KeyError, TypeError) as exc:
                        raise ValueError(f"{path} line {n}: not an annotation line of the original ({exc})") from None
                    images.append(image)
        else:
            data = read_json(self.annotation_file)
            chosen = [img for img in data["images"] if str(img.get("split")) == split][:PAPER_IMAGES]
            images = [self.image_id(img) for img in chosen]
            counts = [min(PAPER_CAPTIONS, len(img["sentences"])) for img in chosen]
        if not images:
            raise ValueError(f"task {self.name!r}: no images for the paper protocol's {split} set")
        return {"paper_protocol": {"split": split, "images": images, "captions_per_image": counts}}

    # ------------------------------------------------------------------ hard-negative pools, negatives index
    def hard_negative_source(self) -> str:
        """The released pool file the original reads (cleaned or not, as clean_train_sets), if present."""
        if not self.config.released:
            return ""
        name = "hard_negative_cleaned.pkl" if self.clean_train_sets else "hard_negative.pkl"
        path = join_path(self.config.released, name)
        return path if storage.exists(path) else ""

    def finalize_examples(self, examples: list[TaskExample], split: str) -> list[TaskExample]:
        """Marks the training split's examples for a hard-negative option 4 and computes the
        split's hard-negative pools (stored in its negatives index by `split_written`)."""
        images = sorted({ex.payload["image_id"] for ex in examples}, key=_sort_key)
        if len(images) < 2:
            raise ValueError(f"task {self.name!r} split {split!r}: {len(images)} image(s); negatives need >= 2")
        train = split == self.config.splits.train
        for ex in examples:
            ex.payload["hard_option"] = train
        if train:
            self._pools[split] = self.hard_negative_pools(examples)
        return examples

    def hard_negative_pools(self, examples: Sequence[TaskExample]) -> dict[str, list[str]]:
        """image -> similar images of the split: released pool, pool file or TF-IDF (logged)."""
        by_image: dict[str, list[str]] = {}
        for ex in examples:
            by_image.setdefault(ex.payload["image_id"], []).append(ex.payload["caption"])
        released = self.hard_negative_source()
        if released or self.options.hard_negatives_file:
            if released:
                ranked, where = load_hard_negative_pool(released), released
            else:
                ranked, where = read_json(self.options.hard_negatives_file), self.options.hard_negatives_file
            pools = {img: [str(j) for j in ranked.get(img, []) if str(j) in by_image and str(j) != img]
                     [: self.options.hard_negative_pool] for img in by_image}
            empty = [img for img, p in pools.items() if not p]
            if empty:
                tfidf = tfidf_neighbours({img: " ".join(c) for img, c in by_image.items()}, self.options.hard_negative_pool)
                for img in empty:
                    pools[img] = tfidf[img]
            log.info("task %s: hard negatives from %s (%d images; %d not in it get a TF-IDF pool)", self.name, where,
                     len(pools), len(empty))
            return pools
        log.info("task %s: hard negatives from TF-IDF caption similarity (%d images; no released hard_negative.pkl)",
                 self.name, len(by_image))
        return tfidf_neighbours({img: " ".join(c) for img, c in by_image.items()}, self.options.hard_negative_pool)

    def split_written(self, split: str, examples: Sequence[TaskExample], output: str,
                      storage_options: Mapping[str, Any] | None = None) -> None:
        """Writes the split's negatives index (`negatives.npz`) beside its manifest."""
        arrays = SplitNegatives.arrays(examples, self._pools.get(split), self.options.hard_negative_pool)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        storage.write_bytes(join_path(output, NEGATIVES_NAME), buf.getvalue(), dict(storage_options or {}))

    def negatives(self, split: str) -> SplitNegatives:
        if split not in self._negatives:
            self._negatives[split] = SplitNegatives.load(self.config.split_dir(split))
        return self._negatives[split]

    # ------------------------------------------------------------------ workers
    def preprocess(self, sample: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        task = self.task_record(sample)
        caption, image = self.encode(task["caption"]), self.image(sample)
        out = {"key": sample["__key__"], "example_id": task.get("example_id", sample["__key__"]),
               "image_id": str(task["image_id"]), "sent_id": str(task["sent_id"])}
        if self._true_pairs_only:
            return {**out, "texts": [caption], "images": [image]}
        neg = self.negatives(task["split"])
        i = neg.image_of(str(task["image_id"]))
        other_caption = self.encode(neg.caption(neg.random_caption(rng, neg.other_image(rng, i))))
        j = neg.other_image(rng, i)
        other = neg.sample_at(int(neg.caption_sample[neg.random_caption(rng, j)]))
        if not isinstance(other, Sample):
            raise RuntimeError(f"task {self.name!r}: {getattr(other, 'reason', other)}")
        other_image = self.image(sample_dict(other))
        hard_image = neg.hard_image(rng, i) if task.get("hard_option") else neg.other_image(rng, i)
        fourth = self.encode(neg.caption(neg.random_caption(rng, hard_image)))
        return {**out, "texts": [caption, other_caption, caption, fourth], "images": [image, image, other_image, image]}

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> RetrievalBatch:
        fields = collate_rows(examples, self.config.id)
        return RetrievalBatch(**fields, label=torch.zeros(len(examples), dtype=torch.int64),
                              image_ids=[ex["image_id"] for ex in examples], sent_ids=[ex["sent_id"] for ex in examples],
                              task=self.name)

    # ------------------------------------------------------------------ step
    def option_logits(self, output, batch: RetrievalBatch) -> torch.Tensor:
        logits = output.vil_logit.float()
        if logits.numel() != NUM_OPTIONS * batch.num_examples:
            raise ValueError(f"task {self.name!r}: {logits.numel()} vil_logit rows for {batch.num_examples} captions "
                             f"x {NUM_OPTIONS} options")
        return logits.view(batch.num_examples, NUM_OPTIONS)

    def loss(self, output, batch: RetrievalBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.option_logits(output, batch)
        label = batch.label.to(logits.device)
        loss = F.cross_entropy(logits, label)
        with torch.no_grad():
            score = strictly_correct(logits, label).float().mean()
        return loss, {"score": score}

    def score(self, output, batch: RetrievalBatch) -> dict[str, dict[str, Any]]:
        logits = self.option_logits(output, batch).cpu()
        correct = strictly_correct(logits, batch.label.cpu()).tolist()
        return {str(k): {"score": float(c), "prediction": bool(c), "image_id": img}
                for k, c, img in zip(batch.keys, correct, batch.image_ids)}

    def prediction_entry(self, example_id: str, record: Mapping[str, Any]) -> dict[str, Any]:
        return {"sent_id": _id(example_id), "correct": bool(record["prediction"])}

    def write_predictions(self, metric: TaskMetric, path: str | os.PathLike) -> Path:
        if not isinstance(metric, RankingMetric):
            return super().write_predictions(metric, path)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(metric.rankings()), encoding="utf-8")
        os.replace(tmp, path)
        return path

    # ------------------------------------------------------------------ ranking evaluation
    def evaluate_split(self, model: torch.nn.Module, loader: Iterable[RetrievalBatch], device: torch.device | str, *,
                       float_dtype: torch.dtype = torch.float32, zero_shot: bool = False,
                       protocol: str = "full") -> RankingMetric:
        """The standard retrieval metric of a split (`vilbert-ds eval`): `evaluate_ranking`."""
        return self.evaluate_ranking(model, loader, device=device, float_dtype=float_dtype, zero_shot=zero_shot,
                                     protocol=protocol)

    def paper_set(self) -> dict[str, Any]:
        paper = self.assets.get("paper_protocol")
        if not paper:
            raise ValueError(f"task {self.name!r}: {self.config.shards}/assets.json has no paper_protocol test set; "
                             f"rebuild the task shards (vilbert-ds shards task --task {self.name} --rebuild-assets)")
        return paper

    @torch.no_grad()
    def evaluate_ranking(self, model: torch.nn.Module, batches: Iterable[RetrievalBatch], *,
                         device: torch.device | str = "cpu", float_dtype: torch.dtype | None = None,
                         zero_shot: bool = False, image_chunk: int | None = None,
                         protocol: str = "full") -> RankingMetric:
        """Scores every caption of the split against every image (`full`), or the paper
        protocol's 1k images x their first captions (`paper`); see the module docstring.

        `batches` are this rank's batches of the split (the loader's; the first row of each
        example is its true pair); returns the metric merged over all ranks (identical on
        every rank)."""
        if protocol not in ("full", "paper"):
            raise ValueError(f"retrieval protocol {protocol!r}: choose 'full' or 'paper'")
        paper = self.paper_set() if protocol == "paper" else None
        wanted = set(paper["images"]) if paper else None
        chunk = int(image_chunk or self.options.image_chunk)
        captions: dict[str, tuple[str, list[int], list[int]]] = {}
        images: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._true_pairs_only = True  # set before the loader's workers fork
        try:
            for batch in batches:
                first = batch.row_offsets[:-1]
                for i, row in enumerate(first.tolist()):
                    if wanted is not None and batch.image_ids[i] not in wanted:
                        continue
                    length = int(batch.attention_mask[row].sum())
                    captions.setdefault(batch.sent_ids[i], (batch.image_ids[i], batch.input_ids[row, :length].tolist(),
                                                            batch.token_type_ids[row, :length].tolist()))
                    regions = int(batch.image_mask[row].sum())
                    images.setdefault(batch.image_ids[i], (batch.image_feat[row, :regions].clone(),
                                                           batch.image_loc[row, :regions].clone()))
        finally:
            self._true_pairs_only = False
        all_captions = _all_gather_union(captions)
        order = sorted(all_captions, key=_sort_key)
        if paper is not None:
            order = _first_captions(order, all_captions, paper)
        metric = RankingMetric(self.name, [(s, all_captions[s][0]) for s in order], protocol=protocol)

        image_ids = sorted(images, key=_sort_key)
        dtype = float_dtype or torch.float32
        feat = torch.from_numpy(pad_stack([images[i][0].numpy() for i in image_ids])).to(device, dtype) if image_ids else None
        loc = torch.from_numpy(pad_stack([images[i][1].numpy() for i in image_ids])).to(device, dtype) if image_ids else None
        mask = torch.from_numpy(pad_stack([np.ones(images[i][0].size(0), dtype=np.int64) for i in image_ids])).to(device) \
            if image_ids else None
        cfg = getattr(model, "config", None)
        use_task_token = not zero_shot and cfg is not None and getattr(cfg, "task_specific_tokens", False)
        heads = ("seq_relationship",) if zero_shot else ("vil_logit",)
        was_training = model.training
        model.eval()
        columns = torch.zeros(len(order), len(image_ids))
        try:
            for c, sent in enumerate(order):
                _, ids, types = all_captions[sent]
                ids_t = torch.tensor([ids], dtype=torch.int64, device=device)
                types_t = torch.tensor([types], dtype=torch.int64, device=device)
                task_ids = torch.full((1, 1), self.config.id, dtype=torch.int64, device=device) if use_task_token else None
                for start in range(0, len(image_ids), chunk):
                    end = min(len(image_ids), start + chunk)
                    out = model(ids_t, feat[start:end], loc[start:end], types_t, torch.ones_like(ids_t),
                                mask[start:end], task_ids, heads=heads)
                    if zero_shot:
                        s = torch.softmax(out.seq_relationship.float(), dim=-1)[:, 0]
                    else:
                        s = out.vil_logit.float()[:, 0]
                    columns[c, start:end] = s.cpu()
        finally:
            model.train(was_training)
        metric.update({img: {"scores": columns[:, k]} for k, img in enumerate(image_ids)})
        if paper is not None:
            source = describe_asset_source(self.assets.get("source", {"kind": "derived"}))
            metric.note = (f"paper protocol: caption->image, {len(order)} captions x {len(paper['images'])} images of "
                           f"the {paper['split']} set ({source})")
        else:
            metric.note = "full protocol: every caption x every image of the split, both directions"
        merged = metric.gather()
        if paper is not None:
            missing = [img for img in paper["images"] if img not in merged.columns]
            if missing:
                raise ValueError(f"task {self.name!r}: the {paper['split']} shards lack {len(missing)} of the paper "
                                 f"protocol's {len(paper['images'])} images (e.g. {missing[:5]}); build the split "
                                 f"without options.eval_images and with its features")
        return merged


def _first_captions(order: list[str], captions: Mapping[str, tuple[str, Any, Any]], paper: Mapping[str, Any]) -> list[str]:
    """The paper protocol's captions: the first `captions_per_image[k]` (by sentence id) of each
    of its images, in the set's image order."""
    by_image: dict[str, list[str]] = {}
    for sent in order:
        by_image.setdefault(captions[sent][0], []).append(sent)
    out = []
    for image, count in zip(paper["images"], paper["captions_per_image"]):
        out.extend(by_image.get(image, [])[: int(count)])
    return out


def _all_gather_union(items: dict[str, Any]) -> dict[str, Any]:
    """The union of a dict over all ranks (first value per key wins); itself without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(items)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    merged: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            merged.setdefault(k, v)
    return merged
