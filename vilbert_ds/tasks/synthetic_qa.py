"""Synthetic answer-classification tasks (VQA, GQA, GenomeQA, SNLI-VE, GuessWhat, NLVR2) in their
real public annotation formats, with answers that need the image (refer, pointing, retrieval and
VCR: `synthetic_scenes.py`).

A world of coloured objects: classes (colour, noun) for COLORS x NOUNS, each with the fixed
feature prototype of the data area's `SyntheticWorld` (post-ReLU-like 2048-d vectors). An image
holds two objects with different nouns and random colours; each detected region belongs to one of
them (feature = relu(prototype + noise)). Questions are about what the image holds ("what color
is the dog?", "is there a cat?"), so text alone cannot answer them beyond the answer prior.

`make_synthetic_tasks(root, tasks)` writes, under `root`, the layout the packaged tasks.yaml
expects with `data_root = root`:
  annotations/<task>/...   each task's files under their public names and formats
  features/<set>/          region-feature shard sets, built by the data area's shard builder
                           from bottom-up-attention TSV files
  tasks.yaml               the packaged registry with data_root = root and small-data options
Image-id overlaps are deliberate: GuessWhat's test images are also VQA training images, so
clean_train_sets has something to remove.

    python -m vilbert_ds.tasks.synthetic_qa --root /tmp/syn_tasks --tasks vqa,gqa,nlvr2
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from ..data.formats import open_input, write_tsv_row
from ..data.sample import FeatureRecord
from ..data.synthetic import SyntheticSpec, SyntheticWorld
from ..data.writer import BuildConfig, build
from .registry import default_registry_path

COLORS = ("red", "blue", "green")
NOUNS = ("dog", "cat", "car")
SUPPORTED = ("vqa", "gqa", "genomeqa", "snli_ve", "guesswhat", "nlvr2")


@dataclass
class SyntheticTaskSpec:
    images: int = 16  # images per split
    questions_per_image: int = 2
    num_boxes: int = 10  # detected regions per image
    noise: float = 0.3  # feature noise std (prototype scale ~1)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images < 2 or self.questions_per_image < 1 or self.num_boxes < 2:
            raise ValueError("synthetic tasks: images >= 2, questions_per_image >= 1, num_boxes >= 2")


def _stable(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")


class TaskWorld:
    """Images as (FeatureRecord, objects [(colour, noun), (colour, noun)]), a pure function of the id."""

    def __init__(self, spec: SyntheticTaskSpec):
        self.spec = spec
        base = SyntheticWorld(SyntheticSpec(num_classes=len(COLORS) * len(NOUNS), seed=spec.seed))
        self.prototypes = base.prototypes  # [9, 2048]; class index = colour * len(NOUNS) + noun

    def objects(self, image_id: str) -> list[tuple[str, str]]:
        rng = np.random.default_rng([self.spec.seed, _stable(image_id), 1])
        nouns = rng.choice(len(NOUNS), size=2, replace=False)
        colors = rng.integers(len(COLORS), size=2)
        return [(COLORS[int(c)], NOUNS[int(n)]) for c, n in zip(colors, nouns)]

    def image(self, image_id: str) -> FeatureRecord:
        s = self.spec
        rng = np.random.default_rng([s.seed, _stable(image_id), 2])
        objs = self.objects(image_id)
        classes = np.array([COLORS.index(c) * len(NOUNS) + NOUNS.index(n) for c, n in objs])
        region_class = classes[rng.permutation(np.arange(s.num_boxes) % 2)]
        features = np.maximum(self.prototypes[region_class] + rng.normal(0.0, s.noise, (s.num_boxes, 2048)), 0.0)
        w, h = int(rng.integers(320, 641)), int(rng.integers(240, 481))
        x1, y1 = rng.uniform(0, w * 0.6, s.num_boxes), rng.uniform(0, h * 0.6, s.num_boxes)
        x2 = np.minimum(x1 + rng.uniform(20, w * 0.4, s.num_boxes), w - 1)
        y2 = np.minimum(y1 + rng.uniform(20, h * 0.4, s.num_boxes), h - 1)
        return FeatureRecord(image_id=image_id, image_w=w, image_h=h, boxes=np.stack([x1, y1, x2, y2], 1).astype(np.float32),
                             features=features.astype(np.float32))

    def question(self, image_id: str, k: int) -> tuple[str, str]:
        """(question, answer) number k about an image: colour of a present object, or presence."""
        rng = np.random.default_rng([self.spec.seed, _stable(image_id), 3, k])
        objs = self.objects(image_id)
        if rng.random() < 0.6:
            color, noun = objs[int(rng.integers(2))]
            return f"what color is the {noun}?", color
        noun = NOUNS[int(rng.integers(len(NOUNS)))]
        return f"is there a {noun}?", "yes" if noun in {n for _, n in objs} else "no"

    def statement(self, image_ids: list[str], k: int) -> tuple[str, bool | None]:
        """'there is a <colour> <noun>': True if an image holds it, False if the noun is there in
        another colour, None (neutral) if the noun is absent."""
        rng = np.random.default_rng([self.spec.seed, _stable("|".join(image_ids)), 4, k])
        objs = [o for i in image_ids for o in self.objects(i)]
        if rng.random() < 0.5:
            color, noun = objs[int(rng.integers(len(objs)))]
        else:
            color, noun = COLORS[int(rng.integers(len(COLORS)))], NOUNS[int(rng.integers(len(NOUNS)))]
        if (color, noun) in objs:
            return f"there is a {color} {noun}.", True
        return f"there is a {color} {noun}.", (False if noun in {n for _, n in objs} else None)


def _human_answers(answer: str, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Ten VQA-style human answers: mostly the truth, some noise (so soft scores are < 1 sometimes)."""
    pool = list(COLORS) + ["yes", "no"]
    out = []
    for i in range(10):
        a = answer if rng.random() < 0.85 else pool[int(rng.integers(len(pool)))]
        out.append({"answer": a.capitalize() if rng.random() < 0.2 else a, "answer_confidence": "yes", "answer_id": i + 1})
    return out


def _dump(path: Path, obj: Any, lines: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if lines:
            for row in obj:
                f.write(json.dumps(row) + "\n")
        else:
            json.dump(obj, f)


# ------------------------------------------------------------------------------ per format
# Each writer returns {feature set name: [image ids]} and the tasks.yaml option overrides.
def _write_vqa(world: TaskWorld, root: Path, spec: SyntheticTaskSpec):
    ann = root / "annotations" / "vqa"
    ids = {"train": [str(100 + i) for i in range(spec.images)], "val": [str(1000 + i) for i in range(spec.images)],
           "test": [str(5000 + i) for i in range(spec.images // 2)]}
    rng = np.random.default_rng([spec.seed, 11])
    for part, images in ids.items():
        questions, annotations = [], []
        for image in images:
            for k in range(spec.questions_per_image):
                q, a = world.question(image, k)
                qid = int(image) * 10 + k
                questions.append({"image_id": int(image), "question": q, "question_id": qid})
                annotations.append({"question_id": qid, "image_id": int(image), "question_type": q.split()[0],
                                    "answer_type": "yes/no" if a in ("yes", "no") else "other",
                                    "multiple_choice_answer": a, "answers": _human_answers(a, rng)})
        year = "2015" if part == "test" else "2014"
        _dump(ann / f"v2_OpenEnded_mscoco_{part}{year}_questions.json", {"info": {}, "task_type": "Open-Ended",
                                                                          "data_type": "mscoco", "questions": questions})
        if part != "test":
            _dump(ann / f"v2_mscoco_{part}2014_annotations.json", {"info": {}, "annotations": annotations})
    holdout = spec.images * spec.questions_per_image // 2
    return {"coco": ids["train"] + ids["val"] + ids["test"]}, {"options": {"holdout": holdout, "min_answer_count": 1}}


def _write_gqa(world: TaskWorld, root: Path, spec: SyntheticTaskSpec):
    ann = root / "annotations" / "gqa"
    ids = {p: [f"n{o + i}" for i in range(spec.images)] for p, o in (("train", 200), ("val", 2000), ("testdev", 6000))}
    for part, images in ids.items():
        out = {}
        for image in images:
            for k in range(spec.questions_per_image):
                q, a = world.question(image, k)
                out[f"{image[1:]}{k:02d}"] = {"imageId": image, "question": q, "answer": a, "fullAnswer": f"It is {a}.",
                                             "isBalanced": True, "types": {"structural": "query"}}
        _dump(ann / f"{part}_balanced_questions.json", out)
    holdout = spec.images * spec.questions_per_image // 2
    return {"gqa": [i for v in ids.values() for i in v]}, {"options": {"holdout": holdout, "min_answer_count": 1}}


def _write_genome(world: TaskWorld, root: Path, spec: SyntheticTaskSpec):
    images = [str(300 + i) for i in range(2 * spec.images)]
    data = []
    for image in images:
        qas = []
        for k in range(spec.questions_per_image):
            q, a = world.question(image, k)
            qas.append({"qa_id": int(image) * 10 + k, "image_id": int(image), "question": q.capitalize(),
                        "answer": a.capitalize() + ".", "a_objects": [], "q_objects": []})
        data.append({"id": int(image), "qas": qas})
    _dump(root / "annotations" / "visual_genome" / "question_answers.json", data)
    holdout = spec.images * spec.questions_per_image // 2
    return {"vg": images}, {"options": {"holdout": holdout, "min_answer_count": 1}}


def _write_snli_ve(world: TaskWorld, root: Path, spec: SyntheticTaskSpec):
    labels = {True: "entailment", False: "contradiction", None: "neutral"}
    all_ids = []
    for part, offset in (("train", 400), ("dev", 4000), ("test", 7000)):
        rows = []
        for i in range(spec.images):
            image = str(offset + i)
            all_ids.append(image)
            for k in range(spec.questions_per_image):
                text, truth = world.statement([image], k)
                rows.append({"Flikr30kID": f"{image}.jpg", "sentence1": "an image.", "sentence2": text,
                             "gold_label": labels[truth], "pairID": f"{image}.jpg#{k}r1{labels[truth][0]}",
                             "captionID": f"{image}.jpg#{k}"})
        _dump(root / "annotations" / "snli_ve" / f"snli_ve_{part}.jsonl", rows, lines=True)
    return {"flickr30k": all_ids}, {}


def _write_guesswhat(world: TaskWorld, root: Path, spec: SyntheticTaskSpec):
    # test images are VQA training images: clean_train_sets removes them from VQA's train split
    parts = {"train": [str(3000 + i) for i in range(spec.images)], "valid": [str(3500 + i) for i in range(spec.images)],
             "test": [str(100 + i) for i in range(min(4, spec.images))]}
    qid = 1
    for part, images in parts.items():
        games = []
        for image in images:
            qas = []
            for k in range(spec.questions_per_image):
                text, truth = world.statement([image], k)
                answer = {True: "Yes", False: "No", None: "N/A"}[truth]
                qas.append({"question": text.replace("there is a", "is it a").rstrip(".") + "?", "answer": answer, "id": qid})
                qid += 1
            rec = world.image(image)
            objects = []
            for j, (_, noun) in enumerate(world.objects(image)):  # one box per object, COCO xywh
                x1, y1, x2, y2 = (float(v) for v in rec.boxes[j])
                objects.append({"id": int(image) * 10 + j, "category": noun, "category_id": NOUNS.index(noun) + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "segment": [],
                                "iscrowd": False})
            games.append({"id": int(image), "qas": qas, "image": {"id": int(image), "width": rec.image_w,
                                                                   "height": rec.image_h,
                                                                   "file_name": f"COCO_{int(image):012d}.jpg"},
                          "objects": objects, "object_id": objects[0]["id"], "status": "success"})
        _dump(root / "annotations" / "guesswhat" / f"guesswhat.{part}.jsonl", games, lines=True)
    return {"coco": [i for v in parts.values() for i in v]}, {}


def _write_nlvr2(world: TaskWorld, root: Path, spec: SyntheticTaskSpec):
    images = []
    for part in ("train", "dev", "test1"):
        rows = []
        for i in range(spec.images):
            stem = f"{part}-{i}-0"
            pair = [f"{stem}-img0", f"{stem}-img1"]
            images += pair
            for k in range(spec.questions_per_image):
                text, truth = world.statement(pair, k)
                rows.append({"identifier": f"{stem}-{k}", "sentence": text.replace("there is", "one of the images has"),
                             "label": "True" if truth else "False", "synset": "synthetic", "directory": str(i % 10)})
        _dump(root / "annotations" / "nlvr2" / f"{part}.json", rows, lines=True)
    return {"nlvr2": images}, {}


WRITERS: dict[str, Callable[..., tuple[dict[str, list[str]], dict[str, Any]]]] = {
    "vqa": _write_vqa, "gqa": _write_gqa, "genomeqa": _write_genome, "snli_ve": _write_snli_ve,
    "guesswhat": _write_guesswhat, "nlvr2": _write_nlvr2,
}


def write_feature_set(world: TaskWorld, out_dir: Path, image_ids: list[str]) -> str:
    """A region-feature shard set for the images, via TSV and the data area's shard builder."""
    return write_feature_records(out_dir, [world.image(image) for image in sorted(set(image_ids))])


def write_feature_records(out_dir: Path, records: list[FeatureRecord]) -> str:
    """A region-feature shard set from records (the first record of each image id), via TSV and
    the data area's shard builder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tsv = out_dir / "features.tsv"
    with open(tsv, "wb") as f:
        seen = set()
        for rec in records:
            if rec.image_id not in seen:
                seen.add(rec.image_id)
                write_tsv_row(f, rec, with_cls_prob=False)
    build(open_input("tsv", [str(tsv)]), None, BuildConfig(output=str(out_dir), prefix="features", max_count=64,
                                                          missing_caption="none", progress=False,
                                                          rebuild=True))  # a rerun rewrites the TSV: replace
    tsv.unlink()
    return str(out_dir)


def make_synthetic_tasks(root: str | os.PathLike, tasks: list[str] | tuple[str, ...] = SUPPORTED,
                         spec: SyntheticTaskSpec | None = None, extra_overrides: dict[str, dict] | None = None) -> Path:
    """Writes annotations + feature shards for `tasks` under `root`; returns root/tasks.yaml."""
    spec = spec or SyntheticTaskSpec()
    root = Path(root)
    world = TaskWorld(spec)
    unknown = [t for t in tasks if t not in WRITERS]
    if unknown:
        raise ValueError(f"synthetic tasks: no generator for {unknown}; available: {list(WRITERS)}")
    images: dict[str, list[str]] = {}
    overrides: dict[str, dict] = {}
    for task in tasks:
        sets, opts = WRITERS[task](world, root, spec)
        for name, ids in sets.items():
            images.setdefault(name, []).extend(ids)
        overrides[task] = opts
    for name, ids in images.items():
        write_feature_set(world, root / "features" / name, ids)
    raw = yaml.safe_load(Path(default_registry_path()).read_text(encoding="utf-8"))
    raw["data_root"] = str(root)
    for task, opts in overrides.items():
        entry = raw["tasks"][task]
        entry.update({k: v for k, v in opts.items() if k != "options"})
        entry["options"] = {**(entry.get("options") or {}), **opts.get("options", {})}
        if entry["options"].get("answers_from") and entry["options"]["answers_from"] not in tasks:
            entry["options"]["answers_from"] = ""  # GenomeQA without VQA: its own label map
        entry.update((extra_overrides or {}).get(task, {}))
    path = root / "tasks.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def text_only_baseline(registry, task: str) -> float:
    """The best validation score a model that never sees the image can expect: for each text
    (question, hypothesis, sentence) the training split's most frequent answer/label, else the
    overall most frequent one. Scored with the task's metric (VQA accuracy or accuracy)."""
    from collections import Counter, defaultdict

    from .metrics import normalize_vqa_answer, vqa_accuracy
    from .registry import build_family

    cfg = registry.resolve(task)
    family = build_family(cfg)
    train, val = family.read_annotations(cfg.splits.train), family.read_annotations(cfg.splits.val)
    classifier = cfg.family == "vl_classifier"

    def text_of(ex):
        return ex.payload["question"].lower() if classifier else ex.payload["text"].lower()

    def label_of(ex):
        return normalize_vqa_answer(ex.payload["answer"]) if classifier else ex.payload["label"]

    by_text: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for ex in train:
        by_text[text_of(ex)][label_of(ex)] += 1
        overall[label_of(ex)] += 1
    scores = []
    for ex in val:
        counts = by_text.get(text_of(ex)) or overall
        guess = counts.most_common(1)[0][0]
        scores.append(vqa_accuracy(guess, ex.payload["answers"]) if classifier else float(guess == ex.payload["label"]))
    return float(np.mean(scores))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vilbert_ds.tasks.synthetic_qa", description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    p.add_argument("--tasks", default=",".join(SUPPORTED))
    p.add_argument("--images", type=int, default=16, help="images per split")
    p.add_argument("--questions", type=int, default=2, help="questions per image")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    spec = SyntheticTaskSpec(images=args.images, questions_per_image=args.questions, seed=args.seed)
    print(make_synthetic_tasks(args.root, [t for t in args.tasks.split(",") if t], spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
