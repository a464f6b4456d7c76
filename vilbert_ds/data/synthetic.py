"""Synthetic region features with learnable structure, written in the real input formats.

A small "world" of K object classes ("red dog", "blue car", ...; every word is one token of the
uncased BERT vocab). Each class has a fixed random prototype in the 2048-d (post-ReLU-like,
non-negative) feature space and a detector class id in 1..1600 (0 is background). An image holds
1-3 classes; each of its regions belongs to one of them: feature = relu(prototype + noise), the
1601-way cls_prob peaks on the region's detector class, and the caption names the classes
present ("a photo of a red dog and a blue car"). So masked language modelling (the class words
are predictable from the regions), masked-region KL (a masked region's class is predictable
from its same-class neighbours and the caption) and image-text alignment all carry real signal.

    python -m vilbert_ds.data.synthetic --out /tmp/syn --images 64 --format tsv
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .formats import cc_image_id, write_tsv_row
from .sample import FeatureRecord

COLORS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink", "brown", "gray", "silver")
NOUNS = ("dog", "cat", "car", "tree", "boat", "chair", "cup", "bird", "cube", "sphere", "ball", "horse",
         "house", "clock", "lamp", "ring")
TEMPLATES = ("a photo of {}", "a picture of {}", "there is {}", "an image with {}")


@dataclass
class SyntheticSpec:
    """What to generate. Sizes: features `[num_boxes, feature_dim]`, cls_prob `[num_boxes, num_det_classes]`."""

    num_images: int = 64
    num_classes: int = 8  # K synthetic object classes
    num_boxes: int = 36  # regions per image (CC: exactly 36); min_boxes < num_boxes varies it
    min_boxes: int | None = None
    feature_dim: int = 2048
    num_det_classes: int = 1601  # detector classes incl. background at index 0
    noise: float = 0.3  # std of the per-region feature noise, relative to the prototype scale 1
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.num_classes <= len(COLORS) * len(NOUNS):
            raise ValueError(f"num_classes must be in [1, {len(COLORS) * len(NOUNS)}], got {self.num_classes}")
        if self.num_images < 1 or self.num_boxes < 1:
            raise ValueError("num_images and num_boxes must be >= 1")
        if self.min_boxes is not None and not 1 <= self.min_boxes <= self.num_boxes:
            raise ValueError(f"min_boxes must be in [1, num_boxes={self.num_boxes}], got {self.min_boxes}")
        if self.num_det_classes < 2:
            raise ValueError("num_det_classes must be >= 2 (background + one class)")


class SyntheticWorld:
    """The fixed classes, prototypes and detector ids of a spec (same seed, same world)."""

    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 7919])
        pairs = [(c, n) for n in NOUNS for c in COLORS]
        order = rng.permutation(len(pairs))[: spec.num_classes]
        self.names = [f"{pairs[i][0]} {pairs[i][1]}" for i in order]
        # non-negative sparse-ish prototypes, like post-ReLU fc6 features
        self.prototypes = np.maximum(rng.normal(0.0, 1.0, (spec.num_classes, spec.feature_dim)), 0.0).astype(np.float32) * 2.0
        self.det_class = rng.choice(np.arange(1, spec.num_det_classes), size=spec.num_classes, replace=False)

    def caption(self, classes: list[int], rng: np.random.Generator) -> str:
        phrases = [f"a {self.names[c]}" for c in classes]
        body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(body)

    def image(self, index: int) -> tuple[FeatureRecord, str]:
        """The record of image `index` (with caption) and its CC-style URL."""
        s = self.spec
        rng = np.random.default_rng([s.seed, 104729, index])
        url = f"http://synthetic.invalid/images/{s.seed}/{index}.jpg"
        n = s.num_boxes if s.min_boxes is None else int(rng.integers(s.min_boxes, s.num_boxes + 1))
        k = int(rng.integers(1, min(3, s.num_classes) + 1))
        classes = sorted(rng.choice(s.num_classes, size=k, replace=False).tolist())
        region_class = np.array(classes)[np.arange(n) % k]
        rng.shuffle(region_class)
        features = np.maximum(self.prototypes[region_class] + rng.normal(0.0, s.noise, (n, s.feature_dim)), 0.0)
        w, h = int(rng.integers(320, 641)), int(rng.integers(240, 481))
        x1 = rng.uniform(0, w * 0.7, n)
        y1 = rng.uniform(0, h * 0.7, n)
        x2 = np.minimum(x1 + rng.uniform(16, w * 0.5, n), w - 1)
        y2 = np.minimum(y1 + rng.uniform(16, h * 0.5, n), h - 1)
        boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
        # detector distribution: most mass on the region's class, a little on background/others
        cls_prob = rng.dirichlet(np.full(s.num_det_classes, 0.05), size=n).astype(np.float32) * 0.2
        peak = rng.uniform(0.6, 0.9, n).astype(np.float32)
        cls_prob[np.arange(n), self.det_class[region_class]] += peak
        cls_prob /= cls_prob.sum(axis=1, keepdims=True)
        record = FeatureRecord(image_id=cc_image_id(url), image_w=w, image_h=h, boxes=boxes,
                               features=features.astype(np.float32), cls_prob=cls_prob,
                               caption=self.caption(classes, rng))
        return record, url

    def images(self) -> Iterator[tuple[FeatureRecord, str]]:
        for i in range(self.spec.num_images):
            yield self.image(i)


def write_captions(path_json: str | None, path_cc_tsv: str | None, items: list[tuple[FeatureRecord, str]]) -> None:
    """Captions as `{image_id: caption}` JSON and/or the CC `caption<TAB>url` TSV."""
    if path_json:
        with open(path_json, "w", encoding="utf-8") as f:
            json.dump({r.image_id: r.caption for r, _ in items}, f, ensure_ascii=False, indent=0)
    if path_cc_tsv:
        with open(path_cc_tsv, "w", encoding="utf-8") as f:
            for r, url in items:
                f.write(f"{r.caption}\t{url}\n")


def write_tsv(out_dir: str, spec: SyntheticSpec, *, files: int = 1, with_cls_prob: bool = True) -> dict[str, object]:
    """Bottom-up-attention TSV file(s) + `captions.json` + `captions_cc.tsv`. Returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    world = SyntheticWorld(spec)
    items = list(world.images())
    paths = [os.path.join(out_dir, f"features.tsv.{i}") for i in range(files)]
    handles = [open(p, "wb") for p in paths]
    try:
        for i, (record, _) in enumerate(items):
            write_tsv_row(handles[i * files // len(items)], record, with_cls_prob=with_cls_prob)
    finally:
        for h in handles:
            h.close()
    captions_json = os.path.join(out_dir, "captions.json")
    captions_cc = os.path.join(out_dir, "captions_cc.tsv")
    write_captions(captions_json, captions_cc, items)
    return {"features": paths, "captions_json": captions_json, "captions_cc": captions_cc,
            "class_names": world.names, "num_images": len(items)}


WRITERS = {"tsv": write_tsv}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", default="tsv", choices=sorted(WRITERS), help="input format to write")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--boxes", type=int, default=36, help="regions per image (max when --min-boxes is set)")
    p.add_argument("--min-boxes", type=int, default=None)
    p.add_argument("--files", type=int, default=1, help="number of TSV files to split into")
    p.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    spec = SyntheticSpec(num_images=args.images, num_classes=args.classes, num_boxes=args.boxes,
                         min_boxes=args.min_boxes, seed=args.seed)
    kwargs = {"files": args.files} if args.format == "tsv" else {}
    out = WRITERS[args.format](args.out, spec, **kwargs)
    print(json.dumps({k: v for k, v in out.items()}, indent=1))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
