"""The task-family contract: what a 12-in-1 task implements, and the shared pieces it builds on.

A *task* is one entry of `vilbert_ds/configs/tasks.yaml` (a `TaskConfig`: VQA, GQA, NLVR2, ...).
A *family* is the class implementing one head type for the public annotation formats of its
datasets (`VLClassifierFamily` reads VQA v2, GQA and Visual Genome QA). The registry builds one
family object per task: `FAMILIES[cfg.family](cfg, tokenizer)`.

The life of an example, and which method owns each stage:

1. Build time (`vilbert_ds.tasks.build`, CLI `vilbert-ds shards task`):
   `read_annotations(split) -> list[TaskExample]` parses the dataset's public files (from
   `cfg.annotations`); each example names its image(s) by id per *image slot* ("" = the image,
   "img1" = NLVR2's second image, "gt" = ground-truth-box features) and carries a JSON payload.
   `build_assets(train_examples)` returns task-level data stored beside the shards (e.g. the
   answer vocabulary), derived from the training split or read from the original's released
   files (`asset_source()` says which; `released.py` reads them safely). Test-split images of
   every task of the same image domain are removed from train splits (`clean_train_sets`). The builder joins the examples with the region-feature
   shards by image id and writes one self-contained WebDataset sample per example (layout:
   docs/TASKS.md).
2. Data workers: `preprocess(sample, rng) -> example`, a dict of numpy arrays: tokenised text
   rows, image rows (global mean region first, normalised 5-d boxes, truncated to
   `max_region_num`), targets. `rng` is seeded per (seed, epoch, sample key) by the loader.
3. `collate(examples) -> TaskBatch` (a named-field `Batch`). Examples with several rows (NLVR2's
   two images, multiple-choice options) are flattened here: example i owns rows
   `row_offsets[i]:row_offsets[i+1]`, consecutive.
4. Training step: `forward(model, batch)` runs the model with only this family's `heads` (so the
   other heads get no gradient) and the task token `cfg.id`; `loss(output, batch)` returns
   (scalar loss, {"score": training score of the batch}).
5. Evaluation: `score(output, batch) -> {example id: record}` with record = {"score": float,
   "prediction": ..., ...}; records go into a `TaskMetric` (metrics.py), whose cross-rank merge
   drops the duplicates of padded last batches; `summarize` gives the task's standard metric;
   `write_predictions(metric, path)` writes the public evaluation server's file format.

Everything a family needs beyond this contract lives in its own file.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.batch import VisionTextBatch
from .metrics import TaskMetric

if TYPE_CHECKING:  # pragma: no cover
    from .registry import TaskConfig

FEATURE_DIM = 2048  # region feature width of the released detector
# member-name suffixes of a task sample (docs/TASKS.md); an image slot prefixes its own
TASK_MEMBER = "task.json"
IMAGE_MEMBERS = ("json", "features.npy", "boxes.npy")


def slot_member(slot: str, member: str) -> str:
    """Member extension of an image slot: ("", "features.npy") -> "features.npy";
    ("img1", "features.npy") -> "img1.features.npy"."""
    return f"{slot}.{member}" if slot else member


# ------------------------------------------------------------------------------ build time
@dataclass
class TaskExample:
    """One example as read from the public annotations, before features are joined.

    `example_id` is unique within the task and split (question id, pair identifier, ...);
    `images` maps image slot -> image id (compared as strings with the feature shards'
    `image_id`); `payload` is the JSON-able task content stored as `K.task.json`."""

    example_id: str
    images: dict[str, str]
    payload: dict[str, Any]

    @property
    def key(self) -> str:
        """WebDataset sample key: the example id with the characters WebDataset splits on removed."""
        return str(self.example_id).replace(".", "_").replace("/", "_").replace(" ", "_")


def open_text(path: str | os.PathLike):
    """Open a local or fsspec URL annotation file as text; `.gz` is decompressed."""
    import fsspec

    return fsspec.open(os.fspath(path), "rt", encoding="utf-8", compression="infer").open()


def read_json(path: str | os.PathLike) -> Any:
    try:
        with open_text(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"annotation file {path}: invalid JSON ({exc})") from None


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    try:
        f = open_text(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file {path} does not exist") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"annotation file {path} line {lineno}: invalid JSON ({exc})") from None


def join_path(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def first_existing(root: str, names: Sequence[str]) -> str:
    """The first of `names` under `root` that exists (e.g. a file published plain or gzipped)."""
    import fsspec

    for name in names:
        path = join_path(root, name)
        fs, local = fsspec.core.url_to_fs(path)
        if fs.exists(local):
            return path
    raise FileNotFoundError(f"none of {list(names)} exists under {root}")


def describe_asset_source(source: Mapping[str, Any]) -> str:
    """A task's asset source (`TaskFamily.asset_source`) in words, for logs, build.json and metrics."""
    kind = source.get("kind", "derived")
    if kind == "released":
        return "released " + ", ".join(source.get("files", []))
    if kind == "task":
        return f"the assets of task {source['task']}"
    return "derived from the training annotations"


# ------------------------------------------------------------------------------ text
def encode_text(tokenizer: Any, text: str, max_length: int, text_b: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] a [SEP] (b [SEP]) truncated to `max_length` tokens: (input_ids [L], token_type_ids [L]) int64.

    Single sentences keep their first max_length-2 word pieces (the original). Pairs are trimmed
    from the longer side first."""
    a = tokenizer.encode(text, add_special_tokens=False)
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if text_b is None:
        ids = [cls_id, *a[: max_length - 2], sep_id]
        return np.asarray(ids, dtype=np.int64), np.zeros(len(ids), dtype=np.int64)
    b = tokenizer.encode(text_b, add_special_tokens=False)
    while len(a) + len(b) > max_length - 3:
        (a if len(a) >= len(b) else b).pop()
    ids = [cls_id, *a, sep_id, *b, sep_id]
    types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
    return np.asarray(ids, dtype=np.int64), np.asarray(types, dtype=np.int64)


# ------------------------------------------------------------------------------ regions
def image_regions(features: np.ndarray, boxes: np.ndarray, image_w: float, image_h: float,
                  max_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """Detector output -> the model's region rows, global region first (the original reader).

    features [N, 2048] float16, boxes [N, 4] absolute x1 y1 x2 y2 ->
    (image_feat [R, 2048] float16, image_loc [R, 5] float32) with R = min(N + 1, max_regions):
    row 0 is the mean of all N features with box (0, 0, 1, 1, 1); loc = (x1/W, y1/H, x2/W, y2/H,
    area/(W*H))."""
    n = int(features.shape[0])
    if n == 0:
        raise ValueError("an image with 0 regions cannot be encoded (no global mean region)")
    if boxes.shape != (n, 4):
        raise ValueError(f"boxes {boxes.shape} do not match features {features.shape}")
    w, h = float(image_w), float(image_h)
    if w <= 0 or h <= 0:
        raise ValueError(f"image size {w}x{h} must be positive")
    keep = min(n, max_regions - 1)
    feat = np.empty((keep + 1, features.shape[1]), dtype=np.float16)
    feat[0] = features.astype(np.float32).mean(axis=0)
    feat[1:] = features[:keep]
    b = boxes[:keep].astype(np.float32)
    loc = np.empty((keep + 1, 5), dtype=np.float32)
    loc[0] = (0.0, 0.0, 1.0, 1.0, 1.0)
    loc[1:, 0] = b[:, 0] / w
    loc[1:, 1] = b[:, 1] / h
    loc[1:, 2] = b[:, 2] / w
    loc[1:, 3] = b[:, 3] / h
    loc[1:, 4] = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (w * h)
    return feat, loc


def _decode(value: Any, member: str) -> Any:
    """A member as the loader may hand it over: raw bytes or already decoded."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return value
    if member.endswith(".json") or member == "json":
        return json.loads(bytes(value))
    if member.endswith(".npy"):
        return np.load(io.BytesIO(bytes(value)), allow_pickle=False)
    return value


def sample_member(sample: Mapping[str, Any], member: str) -> Any:
    if member not in sample:
        raise KeyError(
            f"task sample {sample.get('__key__', '?')!r} (shard {sample.get('__url__', '?')}) has no member "
            f"'.{member}'; present: {sorted(k for k in sample if not k.startswith('__'))}"
        )
    return _decode(sample[member], member)


def sample_image(sample: Mapping[str, Any], slot: str, max_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """The region rows of one image slot of a task sample (see `image_regions`)."""
    meta = sample_member(sample, slot_member(slot, "json"))
    features = sample_member(sample, slot_member(slot, "features.npy"))
    boxes = sample_member(sample, slot_member(slot, "boxes.npy"))
    return image_regions(features, boxes, meta["image_w"], meta["image_h"], max_regions)


# ------------------------------------------------------------------------------ batches
@dataclass
class TaskBatch(VisionTextBatch):
    """Rows of (text, image) pairs for one task. B examples become N >= B model rows
    (N = B unless the family flattens pairs or options); `keys` are the B example ids."""

    task_ids: torch.Tensor | None = None  # [N, 1] int64: the task token (TaskConfig.id)
    row_offsets: torch.Tensor | None = None  # [B + 1] int64: example i owns rows offsets[i]:offsets[i+1]
    task: str = ""  # task name (registry key)

    @property
    def num_examples(self) -> int:
        return len(self.keys)

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        return dict(
            input_ids=self.input_ids,
            image_feat=self.image_feat,
            image_loc=self.image_loc,
            token_type_ids=self.token_type_ids,
            attention_mask=self.attention_mask,
            image_attention_mask=self.image_mask,
            task_ids=self.task_ids,
        )


def pad_stack(arrays: Sequence[np.ndarray], length: int | None = None, value: float = 0) -> np.ndarray:
    """[n_i, ...] arrays -> [len(arrays), max n_i (or length), ...], padded with `value`."""
    length = max(a.shape[0] for a in arrays) if length is None else length
    out = np.full((len(arrays), length, *arrays[0].shape[1:]), value, dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    return out


def collate_rows(examples: Sequence[Mapping[str, Any]], task_id: int) -> dict[str, Any]:
    """The vision-text fields of a TaskBatch from preprocessed examples.

    Each example has `texts`: [(input_ids [L], token_type_ids [L]), ...] and `images`:
    [(image_feat [R, 2048], image_loc [R, 5]), ...]; an example contributes
    max(len(texts), len(images)) rows, a single text or image being repeated across its rows
    (NLVR2: one sentence, two images -> rows 2i, 2i+1). Padding is to the longest row of the
    batch; masks mark real tokens / regions. `keys` are the examples' original ids
    (`example_id`, e.g. an SNLI-VE pairID with its dots) where given, else the sample keys."""
    texts, images, offsets = [], [], [0]
    for ex in examples:
        t, v = ex["texts"], ex["images"]
        rows = max(len(t), len(v))
        if len(t) not in (1, rows) or len(v) not in (1, rows):
            raise ValueError(f"example {ex.get('key')!r}: {len(t)} texts and {len(v)} images cannot form rows")
        texts.extend(t if len(t) == rows else t * rows)
        images.extend(v if len(v) == rows else v * rows)
        offsets.append(offsets[-1] + rows)
    ids = pad_stack([t[0] for t in texts])
    return dict(
        input_ids=torch.from_numpy(ids),
        token_type_ids=torch.from_numpy(pad_stack([t[1] for t in texts])),
        attention_mask=torch.from_numpy(pad_stack([np.ones(len(t[0]), dtype=np.int64) for t in texts])),
        image_feat=torch.from_numpy(pad_stack([v[0] for v in images])),
        image_loc=torch.from_numpy(pad_stack([v[1] for v in images])),
        image_mask=torch.from_numpy(pad_stack([np.ones(len(v[0]), dtype=np.int64) for v in images])),
        task_ids=torch.full((ids.shape[0], 1), int(task_id), dtype=torch.int64),
        row_offsets=torch.as_tensor(offsets, dtype=torch.int64),
        keys=[str(ex.get("example_id", ex["key"])) for ex in examples],
    )


# ------------------------------------------------------------------------------ the family
class TaskFamily:
    """Base class of task families. Subclasses set the class attributes and implement
    `read_annotations`, `preprocess`, `collate`, `loss`, `score`, `prediction_entry`."""

    family: ClassVar[str] = ""  # registry key (tasks.yaml `family:`)
    formats: ClassVar[tuple[str, ...]] = ()  # public annotation formats it reads (tasks.yaml `format:`)
    heads: ClassVar[tuple[str, ...]] = ()  # ViLBert heads the family computes
    image_slots: ClassVar[dict[str, str]] = {"": "regions"}  # slot -> feature source (tasks.yaml features)
    batch_type: ClassVar[type[TaskBatch]] = TaskBatch
    # set by the shard builder: whether held-out test images are removed from the training splits
    # (the original picks some released files by it, e.g. hard_negative_cleaned.pkl)
    clean_train_sets: bool = True

    @dataclass
    class Options:
        """Family-specific tasks.yaml `options:` (validated; unknown keys are errors)."""

    def __init__(self, config: "TaskConfig", tokenizer: Any = None):
        self.config = config
        self.tokenizer = tokenizer
        try:
            self.options = self.Options(**config.options)
        except TypeError as exc:
            known = [f.name for f in dataclasses.fields(self.Options)]
            raise ValueError(f"tasks.yaml task {config.name!r} options {config.options}: {exc}; known: {known}") from None
        self._assets: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.config.name

    # -------------------------------------------------------------- build time
    def read_annotations(self, split: str) -> list[TaskExample]:
        """Examples of one split from the public annotation files under `config.annotations`."""
        raise NotImplementedError

    def asset_source(self) -> dict[str, Any]:
        """Where `build_assets` takes the task-level data from, as recorded in `assets.json`
        ("source"): {"kind": "derived"} (from the training annotations), {"kind": "released",
        "files": [...]} (the original's files) or {"kind": "task", "task": name} (another task's
        assets, `shared_assets`). Assets built from another source are rebuilt."""
        return {"kind": "derived"}

    def build_assets(self, train_examples: Sequence[TaskExample]) -> dict[str, Any]:
        """Task-level JSON data derived from the training annotations (answer vocabulary, ...) or
        read from released files, written once to `{shards}/assets.json` before any split is
        built. `train_examples` is empty unless `asset_source()` is "derived". Default: none."""
        return {}

    def shared_assets(self, task: str, assets: Mapping[str, Any]) -> dict[str, Any]:
        """This task's assets from those of `task` (`asset_source()` kind "task")."""
        raise NotImplementedError(f"task {self.name!r} does not share another task's assets")

    def is_cleaned_split(self, split: str) -> bool:
        """Whether `clean_train_sets` removes held-out test images from `split`: the registry's
        train split and any split named like one (the original: "train" in the name)."""
        return split == self.config.splits.train or "train" in split

    def finalize_examples(self, examples: list[TaskExample], split: str) -> list[TaskExample]:
        """A hook run after `build_assets`, before the join (e.g. turn answers into label ids)."""
        return examples

    def split_written(self, split: str, examples: Sequence[TaskExample], output: str,
                      storage_options: Mapping[str, Any] | None = None) -> None:
        """A hook run once a split's shards and manifest are written; `examples` are in the
        order of the set's samples (e.g. an index of the split beside its manifest)."""

    def set_assets(self, assets: Mapping[str, Any]) -> None:
        self._assets = dict(assets)

    @property
    def assets(self) -> dict[str, Any]:
        """`{shards}/assets.json`, read on first use (in each data worker)."""
        if self._assets is None:
            path = join_path(self.config.shards, "assets.json")
            try:
                self._assets = read_json(path)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"task {self.name!r}: {path} is missing; build the task shards first (vilbert-ds shards task)"
                ) from None
        return self._assets

    # -------------------------------------------------------------- data workers
    def preprocess(self, sample: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        raise NotImplementedError

    def task_record(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        return sample_member(sample, TASK_MEMBER)

    def encode(self, text: str, text_b: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        if self.tokenizer is None:
            raise RuntimeError(f"task {self.name!r}: no tokenizer given to the family; it is needed to preprocess")
        return encode_text(self.tokenizer, text, self.config.max_seq_length, text_b)

    def image(self, sample: Mapping[str, Any], slot: str = "") -> tuple[np.ndarray, np.ndarray]:
        return sample_image(sample, slot, self.config.max_region_num)

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> TaskBatch:
        raise NotImplementedError

    def worker_fns(self):
        """(preprocess, collate) for the streaming loader."""
        return self.preprocess, self.collate

    # -------------------------------------------------------------- training / evaluation step
    def forward(self, model: torch.nn.Module, batch: TaskBatch, heads: Sequence[str] | None = None):
        """The ViLBert forward with only this family's heads (or `heads`: () = the trunk alone,
        for embeddings) and the task token (when the model has task tokens)."""
        inputs = batch.model_inputs()
        cfg = getattr(model, "config", None)
        if cfg is not None and not getattr(cfg, "task_specific_tokens", False):
            inputs["task_ids"] = None
        return model(**inputs, heads=self.heads if heads is None else heads)

    def loss(self, output, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def score(self, output, batch: TaskBatch) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def new_metric(self) -> TaskMetric:
        return TaskMetric(self.name)

    def bce_loss(self, logits: torch.Tensor, target: torch.Tensor, scale_by_labels: bool) -> torch.Tensor:
        """The original's BCEWithLogits(mean), times the label count for the VQA-style heads."""
        loss = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="mean")
        return loss * target.size(1) if scale_by_labels else loss

    # -------------------------------------------------------------- prediction files
    def prediction_entry(self, example_id: str, record: Mapping[str, Any]) -> dict[str, Any]:
        """One entry of the public evaluation server's format."""
        return {"id": example_id, "prediction": record.get("prediction")}

    def write_predictions(self, metric: TaskMetric, path: str | os.PathLike) -> Path:
        """A JSON list in the evaluation server's format, sorted by example id."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = [self.prediction_entry(k, metric.records[k]) for k, _ in metric.predictions()]
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(entries), encoding="utf-8")
        os.replace(tmp, path)
        return path


def records_from_scores(keys: Sequence[str], scores: torch.Tensor, predictions: Iterable[Any],
                        labeled: torch.Tensor | None = None,
                        extra: Sequence[Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """{key: {"score", "prediction", **extra}} for B examples; score None where `labeled` [B] is False."""
    out = {}
    flags = labeled.tolist() if labeled is not None else [True] * len(keys)
    extras = extra if extra is not None else [{}] * len(keys)
    for key, s, p, ok, e in zip(keys, scores.detach().float().cpu().tolist(), predictions, flags, extras):
        out[str(key)] = {"score": float(s) if ok else None, "prediction": p, **e}
    return out
