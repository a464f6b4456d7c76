"""Ask a model about your own input: one image (or a few) and a question, caption or expression.

    from vilbert_ds import Predictor, Query
    p = Predictor.from_pretrained("runs/demo/tasks/run", registry="runs/demo/tasks/data/tasks.yaml")
    p.predict("vqa", Query("what color is the dog?", "feats.tsv#17"))          # AnswerResult
    p.predict_many("snli_ve", [Query(text, image) for ...], batch_size=64)     # batched
    p.retrieve("retrieval_coco", ["a red dog"], ["runs/demo/shards"])          # RankingResult
    p.embed("vqa", [Query(...)], states=True).save("emb/")                     # .npy vectors

The CLI is `vilbert-ds predict` (`commands/predict.py`).

**One code path with training and evaluation.** An input becomes exactly what the shard
builders and the reader would make of it, then goes through the task family's own stages:
1. region features in any input format the shard builder reads (`read_images`): a
   bottom-up-attention TSV row, an .npz, an LMDB entry (tensorpack CC or pickled downstream),
   or a sample of a shard set, picked by image id or sample key (`PATH#ID`) ->
   `data.sample.encode` (the feature shard's members: float16 features, validation) ->
   `data.sample.decode` (the reader's `Sample`);
2. a task example (`tasks.base.TaskExample`, the family's documented payload, docs/TASKS.md)
   joined with those images by `tasks.build.sample_members` (the task shard builder) and decoded
   as a task shard sample;
3. `tasks.loader.TaskBatchMaker` (the evaluation loader's batch function: the family's
   `preprocess` with the (seed 0, epoch 0, key) generator, then its `collate`) -> the family's
   `forward` -> its `score` (the chosen answer / class / region) and its public logit accessors
   (the probabilities). Retrieval ranks with the family's `evaluate_ranking`, the function
   `vilbert-ds eval` ranks a split with.
So the tokenizer, region order, global region, box encoding, truncation and task token are the
training and evaluation ones; `tests/test_predict.py` checks predict's scores against `eval`'s.

Answer vocabularies: a VQA/GQA/GenomeQA head is a vector of logits; the label map that says
which answer each unit is travels with the model (`label_maps.json` beside config.json, or in
the run directory), or is given explicitly (`label_map=`: a label_maps.json or a task shard
set's assets.json). `model_label_map` is the one place that finds it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .data.formats import BadRecord, CcLmdbInput, NpzDirInput, PickleLmdbInput, TsvInput
from .data.manifest import MANIFEST_NAME, load_source
from .data.sample import FeatureRecord, Sample, decode, encode, key_for
from .checkpoint import verify_source
from .model import ViLBert
from .model_factory import get_model, source_kind
from .tasks.base import TaskExample, TaskFamily, describe_asset_source, slot_member
from .tasks.build import iter_feature_samples, sample_members
from .tasks.grounding import GT_SLOT
from .tasks.label_maps import LABEL_MAPS_NAME, find_label_maps, read_label_maps
from .tasks.loader import TaskBatchMaker
from .tasks.vl_binary import NLVR2_LABELS
from .tasks.registry import Registry, TaskConfig, build_family, load_registry

PREDICT_SPLIT = "predict"  # the `split` a prediction's task sample carries
FORMATS = ("tsv", "npz", "cc-lmdb", "lmdb-pickle", "shards")


class PredictError(ValueError):
    """Input or model refused by predict: one line saying what and how to fix it."""


# ============================================================================== region features
def split_selector(spec: str) -> tuple[str, str | None]:
    """'feats.tsv#17' -> ('feats.tsv', '17'); a path that itself exists keeps its '#'."""
    if "#" in spec and not os.path.exists(spec):
        path, sel = spec.rsplit("#", 1)
        return path, sel or None
    return spec, None


def detect_format(path: str) -> str:
    """The input format of a path, from what it is (module docstring of `data.formats`)."""
    if "://" in path or path.endswith((".json", ".tar")) or "{" in path:
        return "shards"
    p = Path(path)
    if p.is_dir():
        if (p / MANIFEST_NAME).is_file():
            return "shards"
        if (p / "data.mdb").is_file():
            return _lmdb_kind(path)
        if any(p.glob("*.npz")):
            return "npz"
        raise PredictError(f"{path}: a directory without {MANIFEST_NAME}, data.mdb or .npz files; give a shard set, an "
                           f"LMDB, a directory of .npz files, a TSV file, or --format")
    if not p.exists():
        raise PredictError(f"{path}: no such file or directory")
    if p.suffix == ".npz":
        return "npz"
    if p.suffix in (".mdb", ".lmdb"):
        return _lmdb_kind(path)
    if ".tsv" in p.name:
        return "tsv"
    with open(p, "rb") as f:
        head = f.read(4096)
    if head.count(b"\t") >= 5:
        return "tsv"
    raise PredictError(f"{path}: cannot tell its format; pass --format ({', '.join(FORMATS)})")


def _lmdb_kind(path: str) -> str:
    """cc-lmdb (tensorpack: a `__keys__` entry) or lmdb-pickle (`keys`)."""
    import lmdb

    env = lmdb.open(path, subdir=os.path.isdir(path), readonly=True, lock=False, readahead=False)
    try:
        with env.begin() as txn:
            return "cc-lmdb" if txn.get(b"__keys__") is not None else "lmdb-pickle"
    finally:
        env.close()


def record_sample(record: FeatureRecord, source: str, feature_dim: int) -> Sample:
    """A detector record -> the `Sample` a feature shard holding it would give: the shard
    builder's `encode` (float16 features, shape and finiteness checks) then the reader's `decode`."""
    width = int(record.features.shape[1]) if record.features.ndim == 2 else -1
    if width != feature_dim:
        raise PredictError(f"{source}: region features of width {width} ({list(record.features.shape)}); the model "
                           f"takes [N, {feature_dim}] (config v_feature_size)")
    key = key_for(record.image_id)
    try:
        members = dict(encode(record, key, feature_dim))
        sample = decode(key, members, source, feature_dim=feature_dim)
    except ValueError as exc:
        raise PredictError(f"{source}: {exc}") from None
    return dataclasses.replace(sample, shard=source)


def _records(reader: Any, handles: Sequence[Any]) -> Iterator[FeatureRecord]:
    """The shard builder's reader on some handles; an unreadable record is refused, named."""
    for record in reader.read(handles):
        if isinstance(record, BadRecord):
            raise PredictError(str(record))
        yield record


def _tsv_records(path: str, sel: str | None, feature_dim: int) -> list[FeatureRecord]:
    """The row of image `sel` (or every row) of a bottom-up-attention TSV, read by the shard
    builder's reader. The feature width is taken from the row, so a wrong width is named."""
    reader = TsvInput([path], feature_dim=feature_dim)
    out = []
    with open(reader.paths[0], "rb") as f:
        for handle in reader.index():
            _, _, start, end = handle
            f.seek(start)
            cols = f.read(end - start).split(b"\t", 6)
            if sel is not None and cols[0].decode("utf-8", "replace") != sel:
                continue
            width = _tsv_width(cols)
            rows = TsvInput([path], feature_dim=width) if width and width != feature_dim else reader
            out.extend(_records(rows, [handle]))
            if sel is not None:
                break
    if sel is not None and not out:
        raise PredictError(f"{path}: no row with image id {sel!r}")
    return out


def _tsv_width(cols: list[bytes]) -> int:
    """Feature width of a TSV row from its column sizes (0 when the row is malformed: the reader says why)."""
    import base64

    try:
        n = int(cols[3])
        return len(base64.b64decode(cols[5])) // 4 // n if n > 0 else 0
    except (IndexError, ValueError):
        return 0


def _npz_records(path: str, sel: str | None, feature_dim: int) -> list[FeatureRecord]:
    files = [path] if os.path.isfile(path) else sorted(str(p) for p in Path(path).glob("*.npz"))
    if sel is not None and os.path.isdir(path):
        named = os.path.join(path, f"{sel}.npz")
        files = [named] if os.path.isfile(named) else files
    return _select(_npz_file_records(files, feature_dim), sel, f"{path}: no .npz with image id")


def _npz_file_records(files: list[str], feature_dim: int) -> Iterator[FeatureRecord]:
    """One record per .npz file, read when asked for (a selection stops at its image)."""
    for file in files:
        width = feature_dim  # the file's own width, so that a wrong one is named (not reshaped)
        try:
            with np.load(file, allow_pickle=False) as z:
                arrays = [z[name] for name in ("features", "x") if name in z.files]
                width = int(arrays[0].shape[1]) if arrays and arrays[0].ndim == 2 else feature_dim
        except (OSError, ValueError):
            pass  # the reader names what is wrong with the file
        yield next(_records(NpzDirInput([file], feature_dim=width), [file]))


def _lmdb_records(path: str, kind: str, sel: str | None, feature_dim: int, trust_pickle: bool) -> list[FeatureRecord]:
    reader = (CcLmdbInput([path], feature_dim=feature_dim) if kind == "cc-lmdb"
              else PickleLmdbInput([path], feature_dim=feature_dim, trust_pickle=trust_pickle))
    handles = reader.index()
    if sel is not None:
        by_key = [h for h in handles if h[1] == sel.encode()]
        if by_key:  # an LMDB key (the downstream LMDBs key their records by image id)
            return list(_records(reader, by_key))
    return _select(_records(reader, handles), sel, f"{path}: no key or image id")


def _select(records: Iterator[FeatureRecord], sel: str | None, missing: str) -> list[FeatureRecord]:
    """Every record (`sel` None), or the first with image id `sel` (reading stops there);
    `missing` starts the error when no record has it."""
    if sel is None:
        return list(records)
    for record in records:
        if record.image_id == sel:
            return [record]
    raise PredictError(f"{missing} {sel!r}")


def _shard_samples(url: str, sel: str | None, feature_dim: int, slot: str) -> list[Sample]:
    """Samples of a shard set (feature or task shards; sample key or image id `sel`), the slot
    `slot` of a task sample when it has one. The set is streamed until the sample is found."""
    manifest = load_source(url if url.endswith(".json") or ".tar" in url else f"{url.rstrip('/')}/{MANIFEST_NAME}")
    if manifest.feature_dim != feature_dim:
        raise PredictError(f"{url}: region features of width {manifest.feature_dim}; the model takes [N, {feature_dim}] "
                           f"(config v_feature_size)")
    out, seen = [], set()
    for sample in iter_feature_samples(url):
        if sel is not None and sel not in (sample.key, str(sample.meta.get("image_id"))):
            continue
        image = _slot_sample(sample, slot, feature_dim)
        if sel is None and image.meta.get("image_id") in seen:  # a task set repeats an image per example
            continue
        seen.add(image.meta.get("image_id"))
        out.append(image)
        if sel is not None:
            break
    if sel is not None and not out:
        raise PredictError(f"{url}: no sample with key or image id {sel!r}")
    return out


def _has_slot(sample: Sample, slot: str) -> bool:
    return slot_member(slot, "json") in sample.extra


def _slot_sample(sample: Sample, slot: str, feature_dim: int) -> Sample:
    """Image slot `slot` ("img1", "gt") of a task shard sample as a feature sample; the sample
    itself when it has no such slot (a feature shard sample)."""
    if not slot or not _has_slot(sample, slot):
        return sample
    members = {m: sample.extra[slot_member(slot, m)] for m in ("json", "features.npy", "boxes.npy")}
    where = f"{sample.shard} key {sample.key} slot {slot}"
    return dataclasses.replace(decode(sample.key, members, where, feature_dim=feature_dim), shard=where)


def read_images(spec: str | os.PathLike, *, feature_dim: int = 2048, fmt: str | None = None,
                trust_pickle: bool = False, slot: str = "") -> list[Sample]:
    """Every image `spec` names, as feature-shard `Sample`s (`shard` = where it came from).

    spec = PATH or PATH#ID: a TSV file (ID: image id), an .npz file or a directory of them (ID:
    file stem or image id), an LMDB (ID: key or image id), a shard set directory / manifest.json
    / tar URL (ID: sample key or image id; `slot` picks a task sample's second image "img1" or
    GT boxes "gt"). Without ID: every image it holds."""
    path, sel = split_selector(os.fspath(spec))
    kind = fmt or detect_format(path)
    if kind == "shards":
        return _shard_samples(path, sel, feature_dim, slot)
    if kind == "tsv":
        records = _tsv_records(path, sel, feature_dim)
    elif kind == "npz":
        records = _npz_records(path, sel, feature_dim)
    elif kind in ("cc-lmdb", "lmdb-pickle"):
        records = _lmdb_records(path, kind, sel, feature_dim, trust_pickle)
    else:
        raise PredictError(f"--format {kind!r}: choose one of {', '.join(FORMATS)}")
    if not records:
        raise PredictError(f"{path}: holds no image")
    return [record_sample(rec, rec.source or path, feature_dim) for rec in records]


def read_image(spec: str | os.PathLike, **kwargs: Any) -> Sample:
    """The one image `spec` names (see `read_images`); an input holding several needs PATH#ID."""
    images = read_images(spec, **kwargs)
    if len(images) != 1:
        ids = [str(s.meta.get("image_id")) for s in images[:5]]
        raise PredictError(f"{spec}: holds {len(images)} images ({', '.join(ids)}, ...); name one as PATH#IMAGE_ID")
    return images[0]


def as_sample(image: Any, feature_dim: int, slot: str = "") -> Sample:
    """A FeatureRecord, a Sample or a spec string -> a feature-shard Sample."""
    if isinstance(image, Sample):
        if image.features.shape[1] != feature_dim:
            raise PredictError(f"{image.shard or image.key}: region features of width {image.features.shape[1]}; the "
                               f"model takes [N, {feature_dim}] (config v_feature_size)")
        return _slot_sample(image, slot, feature_dim)
    if isinstance(image, FeatureRecord):
        return record_sample(image, f"image {image.image_id}", feature_dim)
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, feature_dim=feature_dim, slot=slot)
    raise TypeError(f"an image is a FeatureRecord, a Sample or a path (PATH#ID), not {type(image).__name__}")


# ============================================================================== queries and results
@dataclass
class Query:
    """One example: a text and its image(s). `image2`: NLVR2's right image; `gt`: the
    ground-truth-box features the pointing tasks choose among (all their boxes are the
    candidates unless `candidates` [[x1, y1, x2, y2], ...] names some of them)."""

    text: str
    image: Any
    image2: Any = None
    gt: Any = None
    candidates: Sequence[Sequence[float]] | None = None


@dataclass
class AnswerResult:
    """VQA / GQA / GenomeQA: the top answers with softmax probabilities over the label map."""

    task: str
    text: str
    image_id: str
    answer: str  # the family's prediction (its argmax, as `eval` writes it)
    answers: list[dict[str, Any]]  # top k: [{"answer", "probability", "logit"}], best first
    label_map: str  # which label map named the head's units

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ClassResult:
    """SNLI-VE, GuessWhat, NLVR2: the chosen class and the probability of each."""

    task: str
    text: str
    image_ids: list[str]
    label: str
    probabilities: dict[str, float]
    logits: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BoxResult:
    """RefCOCO/+/g (every region) and Visual7W / GuessWhat pointing (the candidate boxes): the
    chosen box in image coordinates (x1 y1 x2 y2 pixels) and the top regions with their scores."""

    task: str
    text: str
    image_id: str
    box: list[float]
    region: int  # region row (refer: 0 = the whole image) or candidate index (pointing)
    probability: float  # softmax over the regions / candidates
    top: list[dict[str, Any]]  # [{"region" | "candidate", "box", "probability", "logit"}], best first

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RankingResult:
    """Retrieval: the score of every caption against every image. `head` is "vil_logit" (a
    retrieval-trained model: the logit) or "alignment" (zero-shot: the pretraining alignment
    head's probability of "aligned")."""

    task: str
    head: str
    captions: list[str]
    image_ids: list[str]
    scores: np.ndarray  # [captions, images] float32
    # the caption a pretraining shard sample stores with its image (None elsewhere): shows what a hit is
    image_captions: list[str | None] = field(default_factory=list)

    def images_for(self, caption: int, top_k: int = 5) -> list[tuple[int, float]]:
        """(image index, score) of the best `top_k` images for caption `caption`."""
        order = np.argsort(-self.scores[caption], kind="stable")[:top_k]
        return [(int(j), float(self.scores[caption, j])) for j in order]

    def captions_for(self, image: int, top_k: int = 5) -> list[tuple[str, float]]:
        order = np.argsort(-self.scores[:, image], kind="stable")[:top_k]
        return [(self.captions[c], float(self.scores[c, image])) for c in order]

    def to_dict(self, top_k: int = 5) -> dict[str, Any]:
        return {"task": self.task, "head": self.head, "captions": self.captions, "image_ids": self.image_ids,
                "scores": self.scores.astype(np.float64).round(6).tolist(),
                "image_captions": self.image_captions,
                "text_to_image": [{"caption": c, "images": [{"image_id": self.image_ids[j], "score": round(s, 6)}
                                                            for j, s in self.images_for(k, top_k)]}
                                  for k, c in enumerate(self.captions)],
                "image_to_text": [{"image_id": img, "captions": [{"caption": c, "score": round(s, 6)}
                                                                 for c, s in self.captions_for(k, top_k)]}
                                  for k, img in enumerate(self.image_ids)]}


@dataclass
class Embeddings:
    """Per model row (NLVR2: two rows per query, left then right image): pooled text / vision /
    fused vectors [rows, C]; with `states`, per-token [rows, L, H] (position 1 is the task token
    when the model has task tokens) and per-region [rows, R, V] states (region 0 = the global
    region) with their masks (1 = real)."""

    pooled_text: np.ndarray
    pooled_vision: np.ndarray
    pooled_fused: np.ndarray
    rows: list[dict[str, Any]]  # per row: {"query", "text", "image_id"}
    text_states: np.ndarray | None = None
    vision_states: np.ndarray | None = None
    text_mask: np.ndarray | None = None
    vision_mask: np.ndarray | None = None

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """One .npy per array + rows.json (which query, text and image each row is)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                np.save(out / f"{f.name}.npy", value, allow_pickle=False)
                written.append(out / f"{f.name}.npy")
        (out / "rows.json").write_text(json.dumps(self.rows, indent=1) + "\n", encoding="utf-8")
        return [*written, out / "rows.json"]


def _concat_padded(parts: list[np.ndarray]) -> np.ndarray:
    """[n_i, L_i, ...] arrays -> [sum n_i, max L_i, ...], zero-padded (batches pad differently)."""
    length = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, [(0, 0), (0, length - p.shape[1])] + [(0, 0)] * (p.ndim - 2)) for p in parts])


# ============================================================================== families
@dataclass
class Prepared:
    """A query as a task example: its payload, images by slot, and what the result needs."""

    example: TaskExample
    images: dict[str, Sample]
    context: dict[str, Any] = field(default_factory=dict)


def _image_id(sample: Sample) -> str:
    return str(sample.meta.get("image_id", sample.key))


def _whole_image(sample: Sample) -> list[float]:
    return [0.0, 0.0, float(sample.meta["image_w"]), float(sample.meta["image_h"])]


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)


class FamilyAdapter:
    """How predict fills one family's task JSON (its documented payload, docs/TASKS.md section 3)
    and reads the family's outputs back. The family itself does everything in between."""

    slots: tuple[str, ...] = ("",)

    def payload(self, index: int, query: Query, images: dict[str, Sample]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(task JSON payload, context for `results`)."""
        raise NotImplementedError

    def results(self, family: TaskFamily, output, batch, prepared: Sequence[Prepared], top_k: int) -> list[Any]:
        raise NotImplementedError


class ClassifierAdapter(FamilyAdapter):
    def payload(self, index, query, images):
        return {"question_id": index, "question": query.text}, {}

    def results(self, family, output, batch, prepared, top_k):
        records = family.score(output, batch)
        answers = family.head_answers
        logits = family.logits(output).float()[:, : len(answers)]
        probs = _softmax(logits)
        out = []
        for i, (key, p) in enumerate(zip(batch.keys, prepared)):
            top = torch.topk(probs[i], min(top_k, len(answers)))
            ranked = [{"answer": answers[j], "probability": round(float(v), 6), "logit": round(float(logits[i, j]), 6)}
                      for v, j in zip(top.values.tolist(), top.indices.tolist())]
            out.append(AnswerResult(family.name, p.example.payload["question"], _image_id(p.images[""]),
                                    records[key]["prediction"], ranked, p.context["label_map"]))
        return out


class LabelAdapter(FamilyAdapter):
    """vl_tri (SNLI-VE, GuessWhat) and vl_binary (NLVR2, two images)."""

    def __init__(self, head: str, slots: tuple[str, ...] = ("",), labels: Sequence[str] | None = None):
        self.head, self.slots, self.labels = head, slots, labels

    def payload(self, index, query, images):
        return {"text": query.text, "label": -1, "question_id": index, "pair_id": str(index),
                "identifier": str(index)}, {}

    def results(self, family, output, batch, prepared, top_k):
        records = family.score(output, batch)
        logits = getattr(output, self.head).float()
        names = list(self.labels or family.label_names)
        probs = _softmax(logits)
        out = []
        for i, (key, p) in enumerate(zip(batch.keys, prepared)):
            out.append(ClassResult(family.name, p.example.payload["text"], [_image_id(p.images[s]) for s in self.slots],
                                   records[key]["prediction"],
                                   {n: round(float(v), 6) for n, v in zip(names, probs[i].tolist())},
                                   {n: round(float(v), 6) for n, v in zip(names, logits[i].tolist())}))
        return out


class ReferAdapter(FamilyAdapter):
    def payload(self, index, query, images):
        image = images[""]
        # ref_box only sets the IoU targets (not the scores); the whole image stands in for the unknown answer
        return {"sent_id": index, "ref_id": -1, "ann_id": -1, "image_id": _image_id(image), "text": query.text,
                "ref_box": _whole_image(image), "train_targets": False}, {}

    def results(self, family, output, batch, prepared, top_k):
        records = family.score(output, batch)
        logits = family.region_logits(output)
        out = []
        for i, (key, p) in enumerate(zip(batch.keys, prepared)):
            real = int(batch.image_mask[i].sum())
            probs = _softmax(logits[i, :real])
            boxes = batch.info[i]["boxes"]
            top = torch.topk(probs, min(top_k, real))
            ranked = [{"region": j, "box": [round(float(c), 2) for c in boxes[j]], "probability": round(float(v), 6),
                       "logit": round(float(logits[i, j]), 6)} for v, j in zip(top.values.tolist(), top.indices.tolist())]
            chosen = int(records[key]["prediction"])
            out.append(BoxResult(family.name, p.example.payload["text"], _image_id(p.images[""]),
                                 [round(float(c), 2) for c in boxes[chosen]], chosen, round(float(probs[chosen]), 6),
                                 ranked))
        return out


class PointingAdapter(FamilyAdapter):
    slots = ("", GT_SLOT)

    def payload(self, index, query, images):
        gt = images[GT_SLOT]
        boxes = ([list(map(float, b)) for b in query.candidates] if query.candidates is not None
                 else gt.boxes.astype(float).tolist())
        if not boxes:
            raise PredictError(f"{gt.shard}: no ground-truth boxes to point at")
        ids = list(range(len(boxes)))
        return ({"qa_id": index, "game_id": index, "image_id": _image_id(images[""]), "text": query.text,
                 "candidate_ids": ids, "candidate_boxes": boxes, "answer_id": 0, "ref_box": boxes[0]},
                {"boxes": boxes})

    def results(self, family, output, batch, prepared, top_k):
        records = family.score(output, batch)
        logits = family.candidate_logits(output, batch)
        out = []
        for i, (key, p) in enumerate(zip(batch.keys, prepared)):
            boxes = p.context["boxes"]
            probs = _softmax(logits[i, : len(boxes)])
            top = torch.topk(probs, min(top_k, len(boxes)))
            ranked = [{"candidate": j, "box": [round(c, 2) for c in boxes[j]], "probability": round(float(v), 6),
                       "logit": round(float(logits[i, j]), 6)} for v, j in zip(top.values.tolist(), top.indices.tolist())]
            chosen = int(records[key]["prediction"])  # candidate ids are their indices
            out.append(BoxResult(family.name, p.example.payload["text"], _image_id(p.images[""]),
                                 [round(c, 2) for c in boxes[chosen]], chosen, round(float(probs[chosen]), 6), ranked))
        return out


class RetrievalAdapter(FamilyAdapter):
    """Ranking goes through `RetrievalFamily.evaluate_ranking` (`Predictor.retrieve` pairs the
    captions with the images so that the ranking sees each of them)."""

    @staticmethod
    def pair(sent_id: str, image_id: str, caption: str) -> dict[str, Any]:
        # hard_option only shapes the 4-way training options, which a ranking never draws
        return {"sent_id": sent_id, "image_id": image_id, "caption": caption, "hard_option": False}


ADAPTERS: dict[str, FamilyAdapter] = {
    "vl_classifier": ClassifierAdapter(),
    "vl_tri": LabelAdapter("vil_tri_prediction"),
    "vl_binary": LabelAdapter("vil_binary_prediction", slots=("", "img1"), labels=NLVR2_LABELS),
    "refer": ReferAdapter(),
    "pointing": PointingAdapter(),
    "retrieval": RetrievalAdapter(),
}


# ============================================================================== model and label map
def load_predict_model(source: str | os.PathLike, config: Any = "base_6layer_6conect") -> ViLBert:
    """The model of `source` as training, eval and export get it (`model_factory.get_model`): a
    model directory, an original checkpoint file (`config`: its preset or original JSON), or a
    training run / checkpoint directory (checked as `vilbert-ds eval` checks it: nothing in it may
    run code)."""
    if not os.path.exists(source):
        raise PredictError(f"{source}: no such model directory, checkpoint file or run directory")
    if source_kind(source) in ("model_dir", "checkpoint"):
        verify_source(source)
    # a training checkpoint's consolidation narrates on stdout and draws progress bars: not predict's output
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_model(source, config=config)


def model_label_map(source: str | os.PathLike, family: TaskFamily,
                    explicit: str | os.PathLike | None = None) -> tuple[list[str], str]:
    """(answers by head unit, where they come from) for an answer-vocabulary task: `explicit`
    (a label_maps.json, or a task shard set's assets.json), else the model's label_maps.json
    (`tasks.label_maps`: beside config.json, or in the run owning a checkpoint)."""
    cfg = family.config
    path = Path(explicit) if explicit else find_label_maps(source)
    if path is None:
        raise PredictError(
            f"task {cfg.name}: {source} carries no label map ({LABEL_MAPS_NAME} beside config.json) saying which "
            f"answer each of the {cfg.head} units is; converted original checkpoints get one from `vilbert-ds convert "
            f"... --label-maps DATASETS_DIR`, trained models from their run (`vilbert-ds export` copies it), or give "
            f"--label-map FILE (a {LABEL_MAPS_NAME}, or the assets.json of the task shards the model was trained on)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PredictError(f"{path}: not a readable label map ({exc})") from None
    if isinstance(raw, dict) and isinstance(raw.get("answers"), list):  # a task shard set's assets.json
        answers = raw["answers"]
        note = f"{path} (task shards' label map, {describe_asset_source(raw.get('source', {'kind': 'derived'}))})"
    else:
        maps = read_label_maps(path)
        entry = maps.get(cfg.name) or maps.get(getattr(family.options, "answers_from", "") or "")
        if entry is None:
            raise PredictError(f"{path} has no label map for task {cfg.name} (it has: {', '.join(maps) or 'none'})")
        if entry["head"] != cfg.head:
            raise PredictError(f"{path}: the label map of task {cfg.name} is for head {entry['head']}, the task uses "
                               f"{cfg.head}")
        answers, note = entry["answers"], f"{path} ({entry.get('source', 'no source given')})"
    if not answers or not all(isinstance(a, str) for a in answers) or len(answers) > cfg.num_labels:
        raise PredictError(f"{path}: task {cfg.name} needs 1..{cfg.num_labels} answer strings, got {len(answers)}")
    return list(answers), note


# ============================================================================== the predictor
def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class Predictor:
    """A model plus the task registry and tokenizer that turn inputs into its batches (module
    docstring). Methods take `Query`s (one text + its image(s)) and return structured results;
    `predict_many` / `embed` batch them (`batch_size` examples per forward)."""

    def __init__(self, model: ViLBert, *, registry: Registry | None = None, tokenizer: Any = None,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 source: str | os.PathLike = "", label_map: str | os.PathLike | None = None):
        from .data.tokenizer import load_tokenizer

        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype
        self.model = model.eval().to(self.device, dtype)
        self.registry = registry if registry is not None else load_registry()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
        self.source = os.fspath(source)
        self.label_map = label_map
        self._families: dict[str, TaskFamily] = {}
        self._label_notes: dict[str, str] = {}

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, config: Any = "base_6layer_6conect",
                        registry: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
                        vocab: str | os.PathLike | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.float32, label_map: str | os.PathLike | None = None) -> "Predictor":
        """A model directory, an original checkpoint file (with its `config`) or a training run;
        `registry`: the tasks.yaml the model was trained with (default: the packaged one)."""
        from .data.tokenizer import load_tokenizer

        return cls(load_predict_model(source, config), registry=load_registry(registry, data_root=data_root),
                   tokenizer=load_tokenizer(vocab or None), device=device, dtype=dtype, source=source,
                   label_map=label_map)

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.v_feature_size)

    # -------------------------------------------------------------- tasks
    def task(self, name: str) -> TaskConfig:
        cfg = self.registry.resolve(name)
        if cfg.family not in ADAPTERS:
            raise PredictError(f"task {cfg.name} (family {cfg.family}) is not supported by predict; supported "
                               f"families: {', '.join(ADAPTERS)}")
        return cfg

    def family(self, name: str) -> TaskFamily:
        cfg = self.task(name)
        if cfg.name not in self._families:
            self._families[cfg.name] = build_family(cfg, self.tokenizer)
        return self._families[cfg.name]

    def missing_heads(self, name: str) -> list[str]:
        """The heads task `name` needs that the model lacks (a pretraining model lacks every task head)."""
        return [h for h in self.family(name).heads if h not in self.model.available_heads]

    def _check_heads(self, name: str) -> None:
        missing = self.missing_heads(name)
        if missing:
            raise PredictError(
                f"model {self.source or '(in memory)'} has no {', '.join(missing)} head, which task "
                f"{self.task(name).name} needs (a pretraining model has no task heads: fine-tune it with `vilbert-ds "
                f"multitask` / `finetune`); its vectors: --embeddings; retrieval tasks rank with its alignment head")

    def _use_label_map(self, family: TaskFamily) -> str:
        """Answer tasks: the model's label map becomes the family's answers (`model_label_map`)."""
        if family.name not in self._label_notes:
            answers, note = model_label_map(self.source, family, self.label_map)
            family.set_assets({"answers": answers})
            self._label_notes[family.name] = note
        return self._label_notes[family.name]

    def image(self, spec: Any, slot: str = "", *, fmt: str | None = None, trust_pickle: bool = False) -> Sample:
        """One image as a feature-shard Sample: a FeatureRecord, a Sample or PATH[#ID] (`read_images`)."""
        if isinstance(spec, (str, os.PathLike)):
            return read_image(spec, feature_dim=self.feature_dim, fmt=fmt, trust_pickle=trust_pickle, slot=slot)
        return as_sample(spec, self.feature_dim, slot)

    # -------------------------------------------------------------- queries -> batches
    def _prepare(self, family: TaskFamily, queries: Sequence[Query]) -> list[Prepared]:
        adapter = ADAPTERS[family.config.family]
        out = []
        for i, q in enumerate(queries):
            main = self.image(q.image)
            images = {"": main}
            # a task shard sample of the same kind carries its second image / GT boxes itself
            image2 = q.image2 if q.image2 is not None or not _has_slot(main, "img1") else main
            gt = q.gt if q.gt is not None or not _has_slot(main, GT_SLOT) else main
            if "img1" in adapter.slots:
                if image2 is None:
                    raise PredictError(f"task {family.name} compares two images: give a second feature input "
                                       f"(--features LEFT RIGHT; Query.image2)")
                images["img1"] = self.image(image2, slot="img1")
            elif q.image2 is not None:
                raise PredictError(f"task {family.name} takes one image, not two")
            if GT_SLOT in adapter.slots:
                if gt is None:
                    raise PredictError(f"task {family.name} points at ground-truth boxes: give their region features "
                                       f"(--gt-features; Query.gt)")
                images[GT_SLOT] = self.image(gt, slot=GT_SLOT)
            elif q.gt is not None:
                raise PredictError(f"task {family.name} takes no ground-truth boxes")
            payload, context = adapter.payload(i, q, images)
            out.append(Prepared(TaskExample(str(i), {s: _image_id(img) for s, img in images.items()}, payload),
                                images, context))
        return out

    def _task_samples(self, family: TaskFamily, prepared: Sequence[Prepared]) -> list[Sample]:
        """Task shard samples of the examples: the task shard builder's members, the reader's decode."""
        samples = []
        for p in prepared:
            members = dict(sample_members(family.name, PREDICT_SPLIT, p.example, p.images))
            where = f"task {family.name} input {p.example.example_id}"
            samples.append(dataclasses.replace(decode(p.example.key, members, where, feature_dim=self.feature_dim),
                                               shard=where))
        return samples

    def _batches(self, family: TaskFamily, prepared: Sequence[Prepared], batch_size: int):
        """(batch, its prepared examples): the evaluation loader's batch function (seed 0, epoch 0)."""
        make = TaskBatchMaker(family, seed=0)
        for start in range(0, len(prepared), max(1, batch_size)):
            chunk = list(prepared[start:start + batch_size])
            yield make(self._task_samples(family, chunk), 0), chunk

    # -------------------------------------------------------------- per-example tasks
    def predict(self, task: str, query: Query, *, top_k: int = 5) -> Any:
        """One query -> AnswerResult / ClassResult / BoxResult (by task family)."""
        return self.predict_many(task, [query], top_k=top_k)[0]

    @torch.no_grad()
    def predict_many(self, task: str, queries: Sequence[Query], *, top_k: int = 5, batch_size: int = 32) -> list[Any]:
        family = self.family(task)
        if family.config.family == "retrieval":
            raise PredictError(f"task {family.name} ranks captions against images: use retrieve()")
        self._check_heads(task)
        note = self._use_label_map(family) if family.config.family == "vl_classifier" else None
        prepared = self._prepare(family, queries)
        if note is not None:
            for p in prepared:
                p.context["label_map"] = note
        adapter = ADAPTERS[family.config.family]
        results = []
        for batch, chunk in self._batches(family, prepared, batch_size):
            batch = batch.to(self.device, float_dtype=self.dtype)
            results.extend(adapter.results(family, family.forward(self.model, batch), batch, chunk, top_k))
        return results

    @torch.no_grad()
    def embed(self, task: str, queries: Sequence[Query], *, states: bool = False, batch_size: int = 32) -> Embeddings:
        """The trunk's vectors for the queries, preprocessed as `task` does (its text length,
        regions, task token); no task head is needed."""
        family = self.family(task)
        if family.config.family == "retrieval":
            raise PredictError(f"embeddings of task {family.name}: ranking scores pairs in image chunks; embed the "
                               f"pairs with a per-example task instead (e.g. vqa, snli_ve)")
        prepared = self._prepare(family, queries)
        parts: dict[str, list[np.ndarray]] = {}
        rows: list[dict[str, Any]] = []
        task_token = bool(getattr(self.model.config, "task_specific_tokens", False))
        slots = ADAPTERS[family.config.family].slots
        for batch, chunk in self._batches(family, prepared, batch_size):
            batch = batch.to(self.device, float_dtype=self.dtype)
            out = family.forward(self.model, batch, heads=())
            got = {"pooled_text": out.pooled_output_t, "pooled_vision": out.pooled_output_v,
                   "pooled_fused": out.pooled_output}
            if states:
                text_mask = batch.attention_mask
                if task_token:  # the task token sits at position 1 of the text states
                    text_mask = torch.cat([text_mask[:, :1], torch.ones_like(text_mask[:, :1]), text_mask[:, 1:]], 1)
                got |= {"text_states": out.sequence_output_t, "vision_states": out.sequence_output_v,
                        "text_mask": text_mask, "vision_mask": batch.image_mask}
            for name, value in got.items():
                parts.setdefault(name, []).append(value.float().cpu().numpy() if value.is_floating_point()
                                                  else value.cpu().numpy())
            offsets = batch.row_offsets.tolist()
            row_slots = [s for s in slots if s != GT_SLOT]  # NLVR2: rows 2i, 2i+1 = left, right image
            for i, p in enumerate(chunk):
                text = p.example.payload.get("text", p.example.payload.get("question"))
                for r in range(offsets[i + 1] - offsets[i]):
                    rows.append({"query": int(p.example.example_id), "text": text,
                                 "image_id": _image_id(p.images[row_slots[r] if r < len(row_slots) else ""])})
        arrays = {k: np.concatenate(v) if k.startswith("pooled") else _concat_padded(v) for k, v in parts.items()}
        return Embeddings(rows=rows, **arrays)

    # -------------------------------------------------------------- retrieval
    @torch.no_grad()
    def retrieve(self, task: str, captions: Sequence[str], images: Sequence[Any], *, zero_shot: bool | None = None,
                 batch_size: int = 64) -> RankingResult:
        """Every caption scored against every image by the family's ranking (`vilbert-ds eval`'s):
        the retrieval head `vil_logit`, or zero-shot the pretraining alignment head (default when
        the model has no task heads: a pretrained model)."""
        family = self.family(task)
        if family.config.family != "retrieval":
            raise PredictError(f"task {family.name} is not a retrieval task; retrieval tasks: "
                               f"{', '.join(c.name for c in self.registry if c.family == 'retrieval')}")
        if zero_shot is None:
            zero_shot = bool(self.missing_heads(task))
        elif not zero_shot:
            self._check_heads(task)
        if not captions or not images:
            raise PredictError(f"task {family.name}: retrieval needs at least one caption and one image")
        samples = [s for img in images for s in ([img] if isinstance(img, (Sample, FeatureRecord))
                                                 else read_images(img, feature_dim=self.feature_dim))]
        samples = [self.image(s) for s in samples]
        # caption c and image i meet at example k = c and k = i, so the ranking sees all of them
        prepared = [Prepared(TaskExample(str(k), {"": _image_id(samples[k % len(samples)])},
                                         RetrievalAdapter.pair(str(k % len(captions)), str(k % len(samples)),
                                                               captions[k % len(captions)])),
                             {"": samples[k % len(samples)]})
                    for k in range(max(len(captions), len(samples)))]
        # made lazily while evaluate_ranking consumes them, as it consumes the eval loader: the
        # family preprocesses them as in a ranking evaluation (true pairs, no negatives drawn)
        batches = (batch for batch, _ in self._batches(family, prepared, batch_size))
        metric = family.evaluate_ranking(self.model, batches, device=self.device, float_dtype=self.dtype,
                                         zero_shot=zero_shot)
        row = {sent: r for r, (sent, _) in enumerate(metric.captions)}
        scores = torch.stack([metric.columns[str(i)] for i in range(len(samples))], dim=1)
        scores = scores[[row[str(c)] for c in range(len(captions))]]
        return RankingResult(family.name, "alignment" if zero_shot else "vil_logit", list(captions),
                             [_image_id(s) for s in samples], scores.numpy().astype(np.float32),
                             [s.meta.get("caption") for s in samples])
