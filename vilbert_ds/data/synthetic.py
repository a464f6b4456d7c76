"""Synthetic region features with learnable structure, written in the real input formats.

A small "world" of K object classes ("red dog", "blue car", ...; every word is one token of the
uncased BERT vocab). Each class has a fixed random prototype in the 2048-d (post-ReLU-like,
non-negative) feature space and a detector class id in 1..1600 (0 is background). An image holds
1-3 classes; each of its regions belongs to one of them: feature = relu(prototype + noise), the
1601-way cls_prob peaks on the region's detector class, and the caption names the classes
present ("a photo of a red dog and a blue car"). So masked language modelling (the class words
are predictable from the regions), masked-region KL (a masked region's class is predictable
from its same-class neighbours and the caption) and image-text alignment all carry real signal.

    python -m vilbert_ds.data.synthetic --out /tmp/syn --images 64 --format tsv   # or cc-lmdb, lmdb-pickle, npz
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .formats import cc_image_id, msgpack_dumps, write_tsv_row
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


def write_cc_lmdb(out_dir: str, spec: SyntheticSpec, *, name: str = "training_feat_all.lmdb") -> dict[str, object]:
    """The original CC pretraining LMDB, laid out as tensorpack's LMDBSerializer.save writes it:
    a single-file LMDB (`name` + `name-lock`), keys `%08d`, msgpack lists with the types of the
    original producer (num_boxes/image_h/image_w/image_id as strings from its CSV reader), and
    `__keys__`. Also `caption_train.json` ({image_id: caption}, the negatives pool)."""
    from .formats import _lmdb_open

    os.makedirs(out_dir, exist_ok=True)
    world = SyntheticWorld(spec)
    items = list(world.images())
    path = os.path.join(out_dir, name)
    env = _lmdb_open(path, write=True, map_size=max(1 << 24, 4 * spec.num_images * spec.num_boxes * 15000))
    keys = []
    with env.begin(write=True) as txn:
        for i, (r, _) in enumerate(items):
            key = f"{i:08}".encode("ascii")
            keys.append(key)
            dp = [r.features.astype(np.float32), r.cls_prob.astype(np.float32), r.boxes.astype(np.float32),
                  str(r.num_boxes), str(r.image_h), str(r.image_w), str(r.image_id), r.caption]
            txn.put(key, msgpack_dumps(dp))
        txn.put(b"__keys__", msgpack_dumps(keys))
    env.sync()
    env.close()
    captions_json = os.path.join(out_dir, "caption_train.json")
    write_captions(captions_json, None, items)
    return {"features": [path], "captions_json": captions_json, "class_names": world.names, "num_images": len(items)}


def write_pickle_lmdb(out_dir: str, spec: SyntheticSpec, *, name: str = "features.lmdb") -> dict[str, object]:
    """A downstream-task feature LMDB as the original `script/convert_to_lmdb.py` writes it: an
    LMDB directory of pickled dicts {image_id, image_h, image_w, num_boxes, boxes, features}
    keyed by str(image_id), plus `keys`. No cls_prob. Captions go to captions.json."""
    from .formats import _lmdb_open

    os.makedirs(out_dir, exist_ok=True)
    world = SyntheticWorld(spec)
    items = list(world.images())
    path = os.path.join(out_dir, name)
    os.makedirs(path, exist_ok=True)
    env = _lmdb_open(path, write=True, map_size=max(1 << 24, 4 * spec.num_images * spec.num_boxes * 10000))
    ids = []
    with env.begin(write=True) as txn:
        for r, _ in items:
            key = str(r.image_id).encode()
            ids.append(key)
            item = dict(image_id=int(r.image_id), image_h=r.image_h, image_w=r.image_w, num_boxes=r.num_boxes,
                        boxes=r.boxes.astype(np.float32), features=r.features.astype(np.float32))
            txn.put(key, pickle.dumps(item))
        txn.put(b"keys", pickle.dumps(ids))
    env.sync()
    env.close()
    captions_json = os.path.join(out_dir, "captions.json")
    write_captions(captions_json, None, items)
    return {"features": [path], "captions_json": captions_json, "class_names": world.names, "num_images": len(items)}


def write_npz(out_dir: str, spec: SyntheticSpec) -> dict[str, object]:
    """A directory of per-image .npz files (features, boxes, cls_prob, image_w, image_h, image_id)."""
    world = SyntheticWorld(spec)
    items = list(world.images())
    feat_dir = os.path.join(out_dir, "npz")
    os.makedirs(feat_dir, exist_ok=True)
    for r, _ in items:
        np.savez(os.path.join(feat_dir, f"{r.image_id}.npz"), features=r.features.astype(np.float32),
                 boxes=r.boxes, cls_prob=r.cls_prob, image_w=np.int64(r.image_w), image_h=np.int64(r.image_h),
                 image_id=np.str_(r.image_id))
    captions_json = os.path.join(out_dir, "captions.json")
    captions_cc = os.path.join(out_dir, "captions_cc.tsv")
    write_captions(captions_json, captions_cc, items)
    return {"features": [feat_dir], "captions_json": captions_json, "captions_cc": captions_cc,
            "class_names": world.names, "num_images": len(items)}


WRITERS = {"tsv": write_tsv, "cc-lmdb": write_cc_lmdb, "lmdb-pickle": write_pickle_lmdb, "npz": write_npz}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", default="tsv", choices=sorted(WRITERS), help="input format to write")
    p.add_argument("--images", type=int, default=64, help="images (one caption each)")
    p.add_argument("--classes", type=int, default=8, help="object classes of the synthetic world")
    p.add_argument("--boxes", type=int, default=36, help="regions per image (max when --min-boxes is set)")
    p.add_argument("--min-boxes", type=int, default=None, help="vary regions per image from this to --boxes")
    p.add_argument("--files", type=int, default=1, help="number of TSV files to split into")
    p.add_argument("--seed", type=int, default=0, help="random seed (the same seed writes the same files)")


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
