"""VL-logit retrieval: caption <-> image retrieval on COCO and Flickr30k (Karpathy splits).

One example per caption (image joined in). Two ways to score:

Training and the per-step validation score (the original `RetreivalDataset`): each caption
becomes 4 model rows, made in `collate`:
  1. the true pair (target index 0);
  2. the same image + a random caption of another image;
  3. a random other image + the same caption;
  4. the same image + a *hard-negative* caption (training split) / a random caption (other splits).
`vil_logit` [4B, 1] is reshaped to [B, 4]; loss = cross-entropy with target 0; score = 4-way
accuracy (ties count as wrong: the answer is always option 0, which torch.max picks on ties).
"Random" partners (options 2, 3, and 4 outside training) are drawn from the other examples of
the same micro-batch (the stream is shuffled, so they are random examples of the
split; draws come from each example's (seed, epoch, key) generator). A micro-batch in which every
caption belongs to one image has no partner: the affected option falls back to a hard-negative
caption with the true image (still a negative; counted in `fallback_negatives`). Unlike the
original, option 3 never keeps stale boxes of the true image.

Hard negatives: the original reads a pool per training image from `hard_negative.pkl`
(similar images mined offline by a model, not published with a producer script). vilbert-ds
builds the pool at shard-build time: the `hard_negative_pool` images whose captions are most
similar by TF-IDF cosine (or the ranked lists of `options.hard_negatives_file`, JSON
`{image_id: [image ids, most similar first]}`, e.g. mined by a model), and stores
`hard_negatives_per_example` captions drawn from it in each example (`hard_captions`), so the
shards stay self-contained; a step picks one at random.

Ranking evaluation (`evaluate_ranking`, the original `eval_retrieval.py`): every caption against
every image of the split; the text batch of 1 is broadcast over a chunk of images inside the
model (`ViLBert` fast mode). R@1/5/10 in both directions (caption->image and image->caption),
median and mean rank. `zero_shot=True` scores with the *pretraining* alignment head
(`seq_relationship`, softmax index 0 = aligned) and no task token, so a pretrained checkpoint
without task heads can be evaluated (the original's `--zero_shot` path crashes). Distributed:
each rank keeps the images of its share of the split, captions are all-gathered (small), each rank
scores all captions against its images, and the per-image score columns are merged by image id,
so the duplicates of padded last batches count once.

Public format: Karpathy's split files in the task's `annotations` directory, `dataset_coco.json`
/ `dataset_flickr30k.json` = `{"images": [{split (train/val/test/restval), filename, cocoid (COCO),
sentences: [{sentid, raw}]}]}`. Image ids: COCO `cocoid`, Flickr30k the file name without
extension. COCO's `restval` joins the training split (`options.restval_in_train`). `eval_images`
> 0 keeps the first N images of the evaluation splits (the original's COCO test used 1000).
Prediction files (no public server): 4-way records `[{"sent_id", "correct"}]`; ranking
`{"text_to_image": [{"sent_id", "image_ids": top 10}], "image_to_text": [{"image_id", "sent_ids": top 10}]}`.
"""
from __future__ import annotations

import json
import math
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import TaskBatch, TaskExample, TaskFamily, collate_rows, join_path, pad_stack, read_json
from .metrics import TaskMetric, _sort_key, rank_of_gold, recall_at_k

NUM_OPTIONS = 4  # true pair, random caption, random image, hard-negative caption
_WORD = re.compile(r"[a-z0-9]+")


@dataclass
class RetrievalBatch(TaskBatch):
    """4 consecutive rows per caption (see the module docstring); rows 4i are the true pairs."""

    label: torch.Tensor | None = None  # [B] int64, index of the true pair among the 4 options (0)
    fallback_negatives: torch.Tensor | None = None  # [] int64: options that had no in-batch partner
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


def stable_rng(*parts: Any) -> np.random.Generator:
    """A generator seeded by strings/ints, identical across processes (unlike hash())."""
    return np.random.default_rng([zlib.crc32(str(p).encode("utf-8")) for p in parts])


# ------------------------------------------------------------------------------ ranking metric
class RankingMetric(TaskMetric):
    """Caption x image scores: `captions` ([(sent_id, image_id)], the same order on every rank)
    and one score column [C] per image. `update({image_id: {"scores": [C]}})` adds columns (the
    first copy of an image wins, so padded repeats count once); `records` hold a placeholder per
    image. `gather()` all-gathers the columns as tensors (not pickled floats: a 5k x 25k COCO
    ranking is 125M scores)."""

    def __init__(self, task: str, captions: Sequence[tuple[str, str]] = ()):
        super().__init__(task)
        self.captions = [(str(s), str(i)) for s, i in captions]
        self.columns: dict[str, torch.Tensor] = {}

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
        return {"task": self.task, "captions": self.captions,
                "records": {img: {"score": None, "scores": col.tolist()} for img, col in self.columns.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.captions = [(str(s), str(i)) for s, i in state["captions"]]
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
        merged = RankingMetric(self.task, self.captions)
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
        t2i = scores.topk(k_img, dim=1).indices.tolist() if k_img else [[] for _ in self.captions]
        i2t = scores.T.topk(k_cap, dim=1).indices.tolist() if k_cap else [[] for _ in images]
        return {
            "text_to_image": [{"sent_id": _id(s), "image_ids": [_id(images[j]) for j in row]}
                              for (s, _), row in zip(self.captions, t2i)],
            "image_to_text": [{"image_id": _id(img), "sent_ids": [_id(self.captions[j][0]) for j in row]}
                              for img, row in zip(images, i2t)],
        }


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
        hard_negatives_per_example: int = 10  # captions from the pool stored in each example
        hard_negatives_file: str = ""  # JSON {image_id: [similar image ids]}; empty = TF-IDF of captions
        eval_images: int = 0  # >0: keep the first N images of non-training splits (COCO 1k test: 1000)
        image_chunk: int = 500  # images per forward in ranking evaluation (the original: 500)

        def __post_init__(self) -> None:
            for key in ("hard_negative_pool", "hard_negatives_per_example", "image_chunk"):
                if int(getattr(self, key)) < 1:
                    raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
            if self.eval_images < 0:
                raise ValueError(f"eval_images={self.eval_images} must be >= 0 (0 = all)")

    # ------------------------------------------------------------------ annotations
    @property
    def annotation_file(self) -> str:
        return join_path(self.config.annotations, f"dataset_{self.config.format}.json")

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
            image = str(img["cocoid"]) if self.config.format == "coco" else Path(str(img["filename"])).stem
            for sent in img["sentences"]:
                payload = {"sent_id": str(sent["sentid"]), "image_id": image, "caption": sent["raw"]}
                out.append(TaskExample(str(sent["sentid"]), {"": image}, payload))
        return out

    def finalize_examples(self, examples: list[TaskExample], split: str) -> list[TaskExample]:
        """Hard-negative captions per example, from a pool of similar images of the same split."""
        by_image: dict[str, list[str]] = {}
        for ex in examples:
            by_image.setdefault(ex.payload["image_id"], []).append(ex.payload["caption"])
        if len(by_image) < 2:
            raise ValueError(f"task {self.name!r} split {split!r}: {len(by_image)} image(s); negatives need >= 2")
        if self.options.hard_negatives_file:
            ranked = read_json(self.options.hard_negatives_file)
            pools = {img: [str(j) for j in ranked.get(img, []) if str(j) in by_image and str(j) != img]
                     [: self.options.hard_negative_pool] for img in by_image}
            empty = [img for img, p in pools.items() if not p]
            if empty:
                raise ValueError(f"{self.options.hard_negatives_file}: no pool (within split {split!r}) for images {empty[:5]}")
        else:
            pools = tfidf_neighbours({img: " ".join(c) for img, c in by_image.items()}, self.options.hard_negative_pool)
        train = split == self.config.splits.train
        for ex in examples:
            pool = pools[ex.payload["image_id"]]
            rng = stable_rng(self.name, "hard", ex.example_id)
            captions = []
            for _ in range(self.options.hard_negatives_per_example):
                pool_captions = by_image[pool[int(rng.integers(len(pool)))]]
                captions.append(pool_captions[int(rng.integers(len(pool_captions)))])
            ex.payload["hard_captions"] = captions
            ex.payload["hard_option"] = train
        return examples

    # ------------------------------------------------------------------ workers
    def preprocess(self, sample: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        task = self.task_record(sample)
        hard = task["hard_captions"]
        return {"key": sample["__key__"], "example_id": task.get("example_id", sample["__key__"]),
                "image_id": str(task["image_id"]), "sent_id": str(task["sent_id"]),
                "caption": self.encode(task["caption"]), "hard": self.encode(hard[int(rng.integers(len(hard)))]),
                "image": self.image(sample), "draws": rng.random(3), "hard_option": bool(task.get("hard_option"))}

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> RetrievalBatch:
        image_ids = [ex["image_id"] for ex in examples]
        rows, fallbacks = [], 0
        for i, ex in enumerate(examples):
            others = [j for j, img in enumerate(image_ids) if img != image_ids[i]]

            def partner(draw: float) -> int | None:
                return others[min(int(draw * len(others)), len(others) - 1)] if others else None

            u2, u3, u4 = (float(u) for u in ex["draws"])
            j2, j3 = partner(u2), partner(u3)
            opt2 = examples[j2]["caption"] if j2 is not None else ex["hard"]
            if j3 is not None:
                opt3 = (ex["caption"], examples[j3]["image"])
            else:
                opt3 = (ex["hard"], ex["image"])
            if ex["hard_option"]:
                opt4 = ex["hard"]
            else:
                j4 = partner(u4)
                opt4 = examples[j4]["caption"] if j4 is not None else ex["hard"]
                fallbacks += j4 is None
            fallbacks += (j2 is None) + (j3 is None)
            rows.append({"key": ex["key"], "example_id": ex.get("example_id", ex["key"]),
                         "texts": [ex["caption"], opt2, opt3[0], opt4],
                         "images": [ex["image"], ex["image"], opt3[1], ex["image"]]})
        fields = collate_rows(rows, self.config.id)
        return RetrievalBatch(**fields, label=torch.zeros(len(examples), dtype=torch.int64),
                              fallback_negatives=torch.tensor(fallbacks, dtype=torch.int64), image_ids=image_ids,
                              sent_ids=[ex["sent_id"] for ex in examples], task=self.name)

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
                       float_dtype: torch.dtype = torch.float32, zero_shot: bool = False) -> RankingMetric:
        """The standard retrieval metric of a split (`vilbert-ds eval`): `evaluate_ranking`."""
        return self.evaluate_ranking(model, loader, device=device, float_dtype=float_dtype, zero_shot=zero_shot)

    @torch.no_grad()
    def evaluate_ranking(self, model: torch.nn.Module, batches: Iterable[RetrievalBatch], *,
                         device: torch.device | str = "cpu", float_dtype: torch.dtype | None = None,
                         zero_shot: bool = False, image_chunk: int | None = None) -> RankingMetric:
        """Scores every caption of the split against every image (see the module docstring).

        `batches` are this rank's batches of the split (the loader's; rows 4i are the true pairs);
        returns the metric merged over all ranks (identical on every rank)."""
        chunk = int(image_chunk or self.options.image_chunk)
        captions: dict[str, tuple[str, list[int], list[int]]] = {}
        images: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for batch in batches:
            first = batch.row_offsets[:-1]
            for i, row in enumerate(first.tolist()):
                length = int(batch.attention_mask[row].sum())
                captions.setdefault(batch.sent_ids[i], (batch.image_ids[i], batch.input_ids[row, :length].tolist(),
                                                        batch.token_type_ids[row, :length].tolist()))
                regions = int(batch.image_mask[row].sum())
                images.setdefault(batch.image_ids[i], (batch.image_feat[row, :regions].clone(),
                                                       batch.image_loc[row, :regions].clone()))
        all_captions = _all_gather_union(captions)
        order = sorted(all_captions, key=_sort_key)
        metric = RankingMetric(self.name, [(s, all_captions[s][0]) for s in order])

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
        return metric.gather()


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
