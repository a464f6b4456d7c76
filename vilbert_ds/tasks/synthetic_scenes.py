"""Synthetic scenes with located objects, written in the public formats of RefCOCO*/RefCOCOg,
Visual7W pointing, GuessWhat pointing, COCO/Flickr30k retrieval (Karpathy) and VCR.

A scene holds 3-4 objects of distinct classes (colour, noun), each in its own cell of a 3x3 grid
(so objects never overlap). Features use the data area's class prototypes
(`data.synthetic.SyntheticWorld`): a region showing an object has relu(prototype + noise).
- GT feature set (slot "gt"): one row per annotated object, its exact box.
- Detected feature set: one jittered box per object (IoU with it > 0.7, same class feature) plus
  background boxes with class-free features, shuffled, so only the features say which region
  shows "the red dog".
Texts name objects by colour and noun ("the red dog", "which is the blue car?", "a photo of a
green cat and a red dog"), so every task needs the image to be solved.

`make_scene_tasks(root, tasks)` writes under `root` the layout of the packaged tasks.yaml with
`data_root = root` (annotations/<task>/..., features/<set>/ built by the data area's shard
builder from bottom-up-attention TSV files) and `root/tasks.yaml` (updating one written by
`tasks.synthetic_qa.make_synthetic_tasks`, so both sets of tasks can train together). Feature sets
get task-specific directories (features/<task>, features/<task>_gt) so they never replace
another generator's shared sets.

    python -m vilbert_ds.tasks.synthetic_scenes --root /tmp/scenes --tasks refcoco,visual7w,retrieval_coco,vcr_q_a
    # learning check: build shards, train a tiny model 400 steps per task, with and without features
    python -m vilbert_ds.tasks.synthetic_scenes --root /tmp/scenes --tasks refcoco --images 40 --train-steps 400
    # the same with the 12-in-1 optimizer recipe (fine-tuning one task: the task's lr, heads 1e-4)
    python -m vilbert_ds.tasks.synthetic_scenes --root /tmp/scenes --tasks refcoco --images 40 --train-steps 400 \
        --deepspeed ds_configs/zero2_12in1.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import sys
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from ..data.sample import FeatureRecord
from ..data.synthetic import SyntheticSpec, SyntheticWorld
from .pointing import V7W_FEATURE_ID
from .registry import default_registry_path
from .synthetic_qa import write_feature_records

COLORS = ("red", "blue", "green", "yellow")
NOUNS = ("dog", "cat", "car")
GRID = 3  # objects sit in distinct cells of a GRID x GRID grid
SUPPORTED = ("refcoco", "refcoco_plus", "refcocog", "visual7w", "guesswhat_pointing", "retrieval_coco",
             "retrieval_flickr30k", "vcr_q_a", "vcr_qa_r")
NAMES = ("Casey", "Riley", "Jessie", "Jackie", "Avery", "Jaime", "Peyton", "Kerry", "Jody", "Kendall")


@dataclass
class SceneSpec:
    images: int = 12  # images of the training split (evaluation splits get half, at least 3)
    num_boxes: int = 8  # detected regions per image (objects + background)
    noise: float = 0.3  # feature noise std (prototype scale ~1)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images < 4 or self.num_boxes < 5:
            raise ValueError(f"synthetic scenes: images={self.images} must be >= 4 and num_boxes={self.num_boxes} >= 5")

    def split_images(self, split: str) -> int:
        return self.images if "train" in split else max(3, self.images // 2)


def _stable(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")


@dataclass
class SceneObject:
    color: str
    noun: str
    box: list[float]  # absolute x1 y1 x2 y2

    @property
    def name(self) -> str:
        return f"{self.color} {self.noun}"

    @property
    def xywh(self) -> list[float]:
        x1, y1, x2, y2 = self.box
        return [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)]


@dataclass
class Scene:
    image_id: str
    width: int
    height: int
    objects: list[SceneObject]
    detected: FeatureRecord
    gt: FeatureRecord


class SceneWorld:
    """Scenes as a pure function of (seed, image id)."""

    def __init__(self, spec: SceneSpec):
        self.spec = spec
        self._scenes: dict[str, Scene] = {}
        base = SyntheticWorld(SyntheticSpec(num_classes=len(COLORS) * len(NOUNS), seed=spec.seed))
        self.prototypes = base.prototypes  # class index = colour * len(NOUNS) + noun

    def class_index(self, obj: SceneObject) -> int:
        return COLORS.index(obj.color) * len(NOUNS) + NOUNS.index(obj.noun)

    def _feature(self, cls: int | None, rng: np.random.Generator) -> np.ndarray:
        centre = self.prototypes[cls] if cls is not None else np.zeros(self.prototypes.shape[1], dtype=np.float32)
        return np.maximum(centre + rng.normal(0.0, self.spec.noise, centre.shape), 0.0).astype(np.float32)

    def scene(self, image_id: str, num_objects: int | None = None) -> Scene:
        """The scene of an image id (the first call fixes its object count; later calls return it)."""
        if image_id not in self._scenes:
            self._scenes[image_id] = self._make(image_id, num_objects)
        return self._scenes[image_id]

    def _make(self, image_id: str, num_objects: int | None) -> Scene:
        s = self.spec
        rng = np.random.default_rng([s.seed, _stable(image_id), 21])
        k = num_objects or int(rng.integers(3, 5))
        w, h = int(rng.integers(360, 641)), int(rng.integers(300, 481))
        classes = rng.choice(len(COLORS) * len(NOUNS), size=k, replace=False)
        cells = rng.choice(GRID * GRID, size=k, replace=False)
        cw, ch = w / GRID, h / GRID
        objects = []
        for cls, cell in zip(classes.tolist(), cells.tolist()):
            cx, cy = cell % GRID, cell // GRID
            bw, bh = cw * rng.uniform(0.5, 0.8), ch * rng.uniform(0.5, 0.8)
            x1 = cx * cw + rng.uniform(0, cw - bw)
            y1 = cy * ch + rng.uniform(0, ch - bh)
            objects.append(SceneObject(COLORS[cls // len(NOUNS)], NOUNS[cls % len(NOUNS)],
                                       [round(float(x1), 2), round(float(y1), 2), round(float(x1 + bw), 2),
                                        round(float(y1 + bh), 2)]))
        gt_boxes = np.array([o.box for o in objects], dtype=np.float32)
        gt_feats = np.stack([self._feature(self.class_index(o), rng) for o in objects])
        # detected: a jittered box per object (shift <= 5% of its size: IoU > 0.7) + background boxes
        det_boxes, det_feats = [], []
        for o in objects:
            x1, y1, x2, y2 = o.box
            dx, dy = (x2 - x1) * rng.uniform(-0.05, 0.05), (y2 - y1) * rng.uniform(-0.05, 0.05)
            det_boxes.append([x1 + dx, y1 + dy, x2 + dx, y2 + dy])
            det_feats.append(self._feature(self.class_index(o), rng))
        for _ in range(max(0, s.num_boxes - k)):
            bx1, by1 = rng.uniform(0, w * 0.6), rng.uniform(0, h * 0.6)
            det_boxes.append([bx1, by1, min(w - 1.0, bx1 + rng.uniform(30, w * 0.4)), min(h - 1.0, by1 + rng.uniform(30, h * 0.4))])
            det_feats.append(self._feature(None, rng))
        order = rng.permutation(len(det_boxes))
        det = FeatureRecord(image_id=image_id, image_w=w, image_h=h,
                            boxes=np.clip(np.array(det_boxes, dtype=np.float32)[order], 0, None),
                            features=np.stack(det_feats)[order])
        gt = FeatureRecord(image_id=image_id, image_w=w, image_h=h, boxes=gt_boxes, features=gt_feats)
        return Scene(image_id, w, h, objects, det, gt)


def _dump(path: Path, obj: Any, lines: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if lines:
            for row in obj:
                f.write(json.dumps(row) + "\n")
        else:
            json.dump(obj, f)


def _ids(prefix: int, spec: SceneSpec, splits: tuple[str, ...]) -> dict[str, list[str]]:
    """Distinct numeric image ids per split, in a task-specific range."""
    out, n = {}, 0
    for split in splits:
        out[split] = [str(prefix + n + i) for i in range(spec.split_images(split))]
        n += spec.split_images(split)
    return out


# ------------------------------------------------------------------------------ writers
# Each returns ({feature source: {"dir": directory name, "records": [FeatureRecord]}}, tasks.yaml overrides).
def _feature_sources(world: SceneWorld, name: str, image_ids: list[str], with_gt: bool,
                     feature_id: str = "{}") -> dict[str, Any]:
    """feature_id: the image id the feature records carry (Visual7W's released files: "v7w_{}")."""
    scenes = [world.scene(i) for i in image_ids]

    def records(kind: str) -> list[FeatureRecord]:
        recs = [getattr(s, kind) for s in scenes]
        if feature_id == "{}":
            return recs
        return [dataclasses.replace(r, image_id=feature_id.format(i)) for i, r in zip(image_ids, recs)]

    out = {"regions": {"dir": name, "records": records("detected")}}
    if with_gt:
        out["gt"] = {"dir": f"{name}_gt", "records": records("gt")}
    return out


def _write_refer(task: str, world: SceneWorld, root: Path, spec: SceneSpec):
    split_by = "umd" if task == "refcocog" else "unc"
    splits = ("train", "val", "test") if task == "refcocog" else ("train", "val", "testA", "testB")
    prefix = {"refcoco": 20000, "refcoco_plus": 30000, "refcocog": 40000}[task]
    ids = _ids(prefix, spec, splits)
    images, annotations, refs = [], [], []
    ann_id, sent_id = prefix * 10, 0
    for split, image_ids in ids.items():
        for image in image_ids:
            scene = world.scene(image)
            images.append({"id": int(image), "width": scene.width, "height": scene.height,
                           "file_name": f"COCO_train2014_{int(image):012d}.jpg"})
            for obj in scene.objects:
                ann_id += 1
                x, y, bw, bh = obj.xywh
                annotations.append({"id": ann_id, "image_id": int(image), "bbox": obj.xywh, "area": round(bw * bh, 2),
                                    "category_id": NOUNS.index(obj.noun) + 1, "iscrowd": 0, "segmentation": []})
                raws = [f"the {obj.name}", f"{obj.color} {obj.noun} in the picture"]
                sentences = []
                for raw in raws:
                    sentences.append({"sent_id": sent_id, "raw": raw, "sent": raw, "tokens": raw.split()})
                    sent_id += 1
                refs.append({"ref_id": len(refs), "ann_id": ann_id, "image_id": int(image), "split": split,
                             "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences],
                             "category_id": NOUNS.index(obj.noun) + 1,
                             "file_name": f"COCO_train2014_{int(image):012d}_{ann_id}.jpg"})
    ann_dir = root / "annotations" / ("refcoco+" if task == "refcoco_plus" else task)
    _dump(ann_dir / "instances.json", {"images": images, "annotations": annotations,
                                       "categories": [{"id": i + 1, "name": n} for i, n in enumerate(NOUNS)]})
    with open(ann_dir / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)  # the published files are Python 2 pickles
    return _feature_sources(world, task, [i for v in ids.values() for i in v], with_gt=True), {}


def _write_visual7w(world: SceneWorld, root: Path, spec: SceneSpec):
    ids = _ids(50000, spec, ("train", "val", "test"))
    images, boxes = [], []
    qa_id = 0
    for split, image_ids in ids.items():
        for image in image_ids:
            scene = world.scene(image, num_objects=4)
            box_ids = []
            for obj in scene.objects:
                box_id = len(boxes) + 1
                x, y, bw, bh = obj.xywh
                boxes.append({"box_id": box_id, "x": x, "y": y, "width": bw, "height": bh, "name": obj.noun})
                box_ids.append(box_id)
            qas = []
            for k, obj in enumerate(scene.objects[:2]):
                qa_id += 1
                others = [b for j, b in enumerate(box_ids) if j != k]
                qas.append({"qa_id": qa_id, "image_id": int(image), "question": f"which is the {obj.name}?",
                            "answer": box_ids[k], "multiple_choices": others, "type": "which"})
            images.append({"image_id": int(image), "filename": f"v7w_{image}.jpg", "split": split, "qa_pairs": qas})
    _dump(root / "annotations" / "visual7w" / "dataset_v7w_pointing.json", {"images": images, "boxes": boxes})
    return _feature_sources(world, "visual7w", [i for v in ids.values() for i in v], with_gt=True,
                            feature_id=V7W_FEATURE_ID), {}


def _write_guesswhat_pointing(world: SceneWorld, root: Path, spec: SceneSpec):
    ids = _ids(60000, spec, ("train", "valid", "test"))
    obj_id, qid = 600000, 0
    for split, image_ids in ids.items():
        games = []
        for g, image in enumerate(image_ids):
            scene = world.scene(image)
            objects = []
            for obj in scene.objects:
                obj_id += 1
                objects.append({"id": obj_id, "bbox": obj.xywh, "category": obj.noun,
                                "category_id": NOUNS.index(obj.noun) + 1, "area": obj.xywh[2] * obj.xywh[3],
                                "iscrowd": False, "segment": []})
            rng = np.random.default_rng([spec.seed, _stable(image), 22])
            target = int(rng.integers(len(objects)))
            goal = scene.objects[target]
            qas = []
            for question, answer in ((f"is it a {goal.noun}?", "Yes"), (f"is it {goal.color}?", "Yes"),
                                     (f"is it a {NOUNS[(NOUNS.index(goal.noun) + 1) % len(NOUNS)]}?", "No")):
                qid += 1
                qas.append({"question": question, "answer": answer, "id": qid})
            games.append({"id": int(image) * 10 + g, "image": {"id": int(image), "width": scene.width,
                                                                "height": scene.height,
                                                                "file_name": f"COCO_train2014_{int(image):012d}.jpg"},
                          "objects": objects, "object_id": objects[target]["id"], "qas": qas, "status": "success",
                          "questioner_id": 0, "timestamp": "2016-01-01 00:00:00"})
        _dump(root / "annotations" / "guesswhat" / f"guesswhat.{split}.jsonl", games, lines=True)
    return _feature_sources(world, "guesswhat_pointing", [i for v in ids.values() for i in v], with_gt=True), {}


def _captions(scene: Scene, image_id: str, seed: int, count: int = 5) -> list[str]:
    rng = np.random.default_rng([seed, _stable(image_id), 23])
    templates = ("a photo of {}", "a picture of {}", "there is {}", "an image with {}", "{} together")
    out = []
    for k in range(count):
        objs = [scene.objects[i] for i in rng.permutation(len(scene.objects))[: int(rng.integers(2, 4))]]
        phrase = " and ".join(f"a {o.name}" for o in objs)
        out.append(templates[k % len(templates)].format(phrase))
    return out


def _write_retrieval(task: str, world: SceneWorld, root: Path, spec: SceneSpec):
    coco = task == "retrieval_coco"
    ids = _ids(70000 if coco else 80000, spec, ("train", "val", "test"))
    if coco:  # a few COCO `restval` images, which join the training split
        ids["restval"] = [str(79000 + i) for i in range(2)]
    images, sent = [], 0
    for split, image_ids in ids.items():
        for image in image_ids:
            scene = world.scene(image)
            sentences = []
            for raw in _captions(scene, image, spec.seed):
                sentences.append({"tokens": raw.split(), "raw": raw, "imgid": len(images), "sentid": sent})
                sent += 1
            entry = {"filepath": "train2014" if coco else "", "sentids": [s["sentid"] for s in sentences],
                     "filename": f"COCO_train2014_{int(image):012d}.jpg" if coco else f"{image}.jpg",
                     "imgid": len(images), "split": split, "sentences": sentences}
            if coco:
                entry["cocoid"] = int(image)
            images.append(entry)
    name = "coco" if coco else "flickr30k"
    ann_dir = root / "annotations" / ("coco_retrieval" if coco else "flickr30k_retrieval")
    _dump(ann_dir / f"dataset_{name}.json", {"images": images, "dataset": name})
    overrides = {"options": {"hard_negative_pool": 4}}
    return _feature_sources(world, task, [i for v in ids.values() for i in v], with_gt=False), overrides


def _vcr_rows(world: SceneWorld, image_ids: list[str], split: str, seed: int) -> list[dict[str, Any]]:
    rows = []
    for n, image in enumerate(image_ids):
        scene = world.scene(image)
        rng = np.random.default_rng([seed, _stable(image), 24])
        # the first object is a person (its name is replaced by a random one); the others keep their noun
        objects = ["person"] + [o.noun for o in scene.objects[1:]]
        j = int(rng.integers(1, len(objects)))
        color = scene.objects[j].color
        wrong = [c for c in COLORS if c != color]
        answer_colors = [color] + wrong[:3]
        order = rng.permutation(4)
        answers = [["it", "is", answer_colors[i], "."] for i in order]
        answer_label = int(np.flatnonzero(order == 0)[0])
        rationales = [[[0], "says", "the", [j], "looks", answer_colors[i], "."] for i in order]
        annot = f"{split}-{n}"
        img_fn = f"lsmdc_synthetic/scene_{image}.jpg"
        row = {"annot_id": annot, "img_id": f"{split}-{image}", "img_fn": img_fn,
               "metadata_fn": img_fn[:-4] + ".json", "movie": "synthetic", "objects": objects,
               "question": ["what", "color", "is", [j], "?"], "answer_choices": answers, "rationale_choices": rationales,
               "question_number": 0, "interesting_scores": [0], "answer_likelihood": "likely"}
        if split != "test":
            row["answer_label"] = answer_label
            row["rationale_label"] = answer_label
        rows.append(row)
    return rows


def _write_vcr(task: str, world: SceneWorld, root: Path, spec: SceneSpec):
    ids = _ids(90000, spec, ("train", "val", "test"))
    ann_dir = root / "annotations" / "vcr"
    for split, image_ids in ids.items():
        _dump(ann_dir / f"{split}.jsonl", _vcr_rows(world, image_ids, split, spec.seed), lines=True)
    with open(ann_dir / "unisex_names_table.csv", "w", encoding="utf-8") as f:
        f.write(",name,total,male_share,gap\n")
        for i, name in enumerate(NAMES):
            f.write(f"{i},{name},{1000 - i},0.5,0.0\n")
    # VCR's feature sets are keyed by img_fn
    records = {}
    for image_ids in ids.values():
        for image in image_ids:
            scene = world.scene(image)
            img_fn = f"lsmdc_synthetic/scene_{image}.jpg"
            for source, rec in (("regions", scene.detected), ("gt", scene.gt)):
                records.setdefault(source, []).append(FeatureRecord(image_id=img_fn, image_w=rec.image_w,
                                                                    image_h=rec.image_h, boxes=rec.boxes,
                                                                    features=rec.features))
    return {"regions": {"dir": "vcr", "records": records["regions"]},
            "gt": {"dir": "vcr_gt", "records": records["gt"]}}, {}


WRITERS: dict[str, Callable[[SceneWorld, Path, SceneSpec], tuple[dict[str, Any], dict[str, Any]]]] = {
    "refcoco": lambda w, r, s: _write_refer("refcoco", w, r, s),
    "refcoco_plus": lambda w, r, s: _write_refer("refcoco_plus", w, r, s),
    "refcocog": lambda w, r, s: _write_refer("refcocog", w, r, s),
    "visual7w": _write_visual7w,
    "guesswhat_pointing": _write_guesswhat_pointing,
    "retrieval_coco": lambda w, r, s: _write_retrieval("retrieval_coco", w, r, s),
    "retrieval_flickr30k": lambda w, r, s: _write_retrieval("retrieval_flickr30k", w, r, s),
    "vcr_q_a": lambda w, r, s: _write_vcr("vcr_q_a", w, r, s),
    "vcr_qa_r": lambda w, r, s: _write_vcr("vcr_qa_r", w, r, s),
}


def write_records(out_dir: Path, records: list[FeatureRecord]) -> str:
    """A region-feature shard set from records, unless `out_dir` already holds one."""
    if (out_dir / "manifest.json").exists():
        return str(out_dir)
    return write_feature_records(out_dir, records)


def make_scene_tasks(root: str | os.PathLike, tasks: list[str] | tuple[str, ...] = SUPPORTED,
                     spec: SceneSpec | None = None, extra_overrides: dict[str, dict] | None = None) -> Path:
    """Writes annotations + feature shard sets for `tasks` under `root`; returns root/tasks.yaml."""
    spec = spec or SceneSpec()
    root = Path(root)
    unknown = [t for t in tasks if t not in WRITERS]
    if unknown:
        raise ValueError(f"synthetic scenes: no generator for {unknown}; available: {list(WRITERS)}")
    world = SceneWorld(spec)
    path = root / "tasks.yaml"
    source = path if path.exists() else Path(default_registry_path())
    raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    raw["data_root"] = str(root)
    for task in tasks:
        sources, overrides = WRITERS[task](world, root, spec)
        features = {}
        for name, item in sources.items():
            features[name] = write_records(root / "features" / item["dir"], item["records"])
        entry = raw["tasks"][task]
        entry["features"] = features
        entry.update(overrides)
        entry.update((extra_overrides or {}).get(task, {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def learning_check(registry_path: str | os.PathLike, task: str, steps: int, *, blind: bool = False, lr: float = 1e-3,
                   micro_batch: int = 8, seed: int = 0, recipe=None, head_lr: float = 1e-4) -> dict[str, float]:
    """Trains a tiny ViLBERT on one task's (built) shards in-process for `steps` updates and returns
    its validation score before and after: torch AdamW at a constant `lr`, or with `recipe` (the
    `engine.DeepSpeedSettings` of a DeepSpeed config) the optimizer DeepSpeed builds from it over
    vilbert-ds's parameter groups (vil_* at `head_lr`), its clipping, and a 10% warmup-linear
    schedule; its lr "auto" is the task's lr, as fine-tuning uses it. `blind=True` is the
    text-only baseline: every example sees the region features of the *next* example of its
    batch (its own boxes stay), so the
    model gets image-shaped input that carries no information about its own image (zeroed
    features would instead silence the multiplicative fusion altogether). The synthetic texts
    name objects by colour and noun, which only the features show."""
    import torch

    from ..model import ViLBert
    from ..model.config import tiny
    from ..data.tokenizer import load_tokenizer
    from .loader import EvalLoader, build_task_loader, evaluate_task
    from ..data.config import DataConfig
    from .registry import build_family, load_registry

    registry = load_registry(registry_path)
    cfg = registry[task]
    family = build_family(cfg, load_tokenizer())
    data = DataConfig(num_workers=0)

    def prepare(batch):
        batch = batch.to("cpu", float_dtype=torch.float32)
        if blind:  # rows of an example are consecutive; shift by one example's rows
            rows = int(batch.row_offsets[1] - batch.row_offsets[0])
            batch.image_feat = torch.roll(batch.image_feat, shifts=rows, dims=0)
        return batch

    def validate(model) -> float:
        model.eval()
        loader = EvalLoader(family, cfg.splits.val, data, rank=0, world_size=1, micro_batch_size=32)
        score = evaluate_task(model, family, (prepare(b) for b in loader), "cpu").result()["score"]
        model.train()
        return score

    torch.manual_seed(seed)
    model = ViLBert(tiny(with_task_heads=True, task_specific_tokens=True))
    schedule, clip = None, 0.0
    if recipe is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    else:  # a learning check of a training recipe: the dev tool reaches up to the engine's optimizer
        from ..engine import LRSchedule, build_optimizer, lr_rule, param_groups, warmup_steps_for

        recipe = recipe.with_lr(cfg.lr) if recipe.lr is None else recipe
        groups = param_groups(model, lr=recipe.lr, weight_decay=recipe.weight_decay,
                              lr_scale=lr_rule(recipe.lr, head_lr))
        optimizer = build_optimizer(groups, recipe)
        schedule = LRSchedule(optimizer, steps, warmup_steps_for(steps, 0.1))
        clip = recipe.gradient_clipping
    loader = build_task_loader(family, cfg.splits.train, data, rank=0, world_size=1, micro_batch_size=micro_batch, seed=seed)
    before = validate(model)
    step, epoch = 0, 0
    while step < steps:
        loader.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            batch = prepare(batch)
            if schedule is not None:
                schedule.step()
            loss, _ = family.loss(family.forward(model, batch), batch)
            optimizer.zero_grad()
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            step += 1
            if step >= steps:
                break
    return {"task": task, "steps": float(steps), "blind": float(blind), "lr": recipe.lr if recipe else lr,
            "val_before": before, "val_after": validate(model)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vilbert_ds.tasks.synthetic_scenes", description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    p.add_argument("--tasks", default=",".join(SUPPORTED))
    p.add_argument("--images", type=int, default=12, help="training images per task (evaluation splits: half)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=0,
                   help="> 0: build the task shards, train a tiny model that many steps per task, with and without "
                        "region features, and print the validation scores (a learning check)")
    p.add_argument("--lr", type=float, default=None,
                   help="constant lr of torch AdamW (default 1e-3); with --deepspeed, replaces the config's lr")
    p.add_argument("--deepspeed", default="", metavar="JSON",
                   help="train with this DeepSpeed config's optimizer (e.g. ds_configs/zero2_12in1.json, the 12-in-1 "
                        "recipe), vil_* heads at --head-lr, 10%% warmup-linear")
    p.add_argument("--head-lr", type=float, default=1e-4, help="with --deepspeed: lr of the vil_* heads")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    path = make_scene_tasks(args.root, tasks, SceneSpec(images=args.images, seed=args.seed))
    print(path)
    if args.train_steps > 0:
        from .build import TaskBuildConfig, build_task
        from .registry import load_registry

        recipe = None
        if args.deepspeed:
            from ..engine import load_ds_config, validate_ds_config

            recipe = validate_ds_config(load_ds_config(args.deepspeed), source=args.deepspeed, world_size=1)
            recipe = recipe.with_lr(args.lr) if args.lr else recipe
        for task in tasks:
            build_task(load_registry(path), task, TaskBuildConfig(max_count=256))
            for blind in (False, True):
                result = learning_check(path, task, args.train_steps, blind=blind, lr=args.lr or 1e-3, seed=args.seed,
                                        recipe=recipe, head_lr=args.head_lr)
                print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
