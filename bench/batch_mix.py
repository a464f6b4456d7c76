"""How task batches are formed: distinct images per batch, by sample order, against uniform sampling.

    python bench/batch_mix.py --quick          # 300 images x 5 questions
    python bench/batch_mix.py                  # 600 images x 5 questions

Task shards are written grouped by image (tasks/build.py joins each question to its image's
features in annotation order: VQA's 5 questions of an image are neighbours in the shard). The
original forms every task batch by uniform sampling (torch RandomSampler / DistributedSampler),
so a batch of B questions covers about as many images as B draws without replacement from the
split. This builds synthetic VQA task shards with the real builders (~5 questions per image) and
runs the real `StreamingLoader` over them in each sample order:
  shard order          no shuffling (the shards as written)
  windows of W         shuffle windows of W samples: the task loader before this measurement
                       (64 MB windows = ~150 samples at VQA's ~430 KB per sample)
  uniform              `shuffle_buffer=None`, what task loaders use now
Per order and batch size: the mean number of distinct images per batch over an epoch, beside
the expectation under uniform sampling, E = sum over images i of 1 - C(N - c_i, B) / C(N, B)
(N questions, c_i of them on image i).
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


class ImageIds:
    """A loader batch function that keeps only each sample's image id."""

    def setup(self) -> None:
        pass

    def __call__(self, samples, epoch):
        return [s.meta["image_id"] for s in samples]


def uniform_expectation(counts: list[int], batch: int) -> float:
    """Expected distinct images in `batch` draws without replacement from questions grouped as
    `counts` per image."""
    n = sum(counts)

    def log_choose(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1) if 0 <= b <= a else -math.inf

    total = log_choose(n, batch)
    return sum(1 - math.exp(log_choose(n - c, batch) - total) for c in counts)


def build_vqa(root: Path, images: int, per_image: int) -> Path:
    """Synthetic VQA annotations -> feature shards -> task shards; returns the trainval manifest."""
    from vilbert_ds.tasks.build import build_task
    from vilbert_ds.tasks.registry import load_registry
    from vilbert_ds.tasks.synthetic_qa import SyntheticTaskSpec, make_synthetic_tasks

    path = make_synthetic_tasks(root, ["vqa"], SyntheticTaskSpec(images=images, questions_per_image=per_image,
                                                                   num_boxes=2))
    build_task(load_registry(path), "vqa")
    return root / "tasks" / "vqa" / "trainval" / "manifest.json"


def make_loader(manifest_url: str, *, batch: int, shuffle: bool, shuffle_buffer: int | None):
    from vilbert_ds.data.manifest import load_source
    from vilbert_ds.data.stream import ReadOptions, Source, StreamingLoader

    m = load_source(manifest_url)
    read = ReadOptions(storage_options={}, chunk_bytes=8 << 20, parallel=1, retries=0, backoff_s=0.0, on_error="fail",
                       feature_dim=m.feature_dim, num_classes=m.num_classes)
    return StreamingLoader([Source(m)], rank=0, world_size=1, micro_batch_size=batch, seed=0, make_batch=ImageIds(),
                           num_workers=0, shuffle=shuffle, shuffle_buffer=shuffle_buffer, read=read, name="vqa")


def distinct_per_batch(manifest_url: str, *, batch: int, shuffle: bool, shuffle_buffer: int | None,
                       epochs: int) -> list[int]:
    loader = make_loader(manifest_url, batch=batch, shuffle=shuffle, shuffle_buffer=shuffle_buffer)
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        out.extend(len(set(ids)) for ids in loader)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="300 images per split, 1 epoch")
    p.add_argument("--images", type=int, default=600, help="synthetic images per split (trainval joins train and val)")
    p.add_argument("--per-image", type=int, default=5, help="questions per image")
    p.add_argument("--batches", type=int, nargs="*", default=[16, 128],
                   help="batch sizes (the original's VQA: 128 over 8 GPUs = 16 per rank)")
    p.add_argument("--old-window", type=int, default=150, help="the previous task loader's window, in samples")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    if args.quick:
        args.images, args.epochs = 300, 1
    C.setup_env()
    root = Path(tempfile.mkdtemp(prefix="vilbert-batch-mix-"))
    try:
        manifest = str(build_vqa(root, args.images, args.per_image))
        shard_order = [i for ids in make_loader(manifest, batch=1, shuffle=False, shuffle_buffer=None) for i in ids]
        counts = list(Counter(shard_order).values())
        table = C.Table(f"Distinct images per batch: synthetic VQA trainval, {len(shard_order)} questions on "
                        f"{len(counts)} images ({len(shard_order) / len(counts):.1f} per image), grouped by image in "
                        f"the shards", ["order", "batch", "distinct images (mean)", "min", "uniform expectation",
                                        "vs expectation"])
        orders = [("shard order", False, None), (f"windows of {args.old_window}", True, args.old_window),
                  ("uniform", True, None)]
        for batch in args.batches:
            expected = uniform_expectation(counts, batch)
            for name, shuffle, buffer in orders:
                got = distinct_per_batch(manifest, batch=batch, shuffle=shuffle, shuffle_buffer=buffer,
                                         epochs=args.epochs if shuffle else 1)
                mean = sum(got) / len(got)
                table.add(**{"order": name, "batch": batch, "distinct images (mean)": mean, "min": min(got),
                             "uniform expectation": expected, "vs expectation": mean / expected})
        table.notes.append(f"{args.epochs} epochs per shuffled order; the StreamingLoader on 1 rank, 0 workers "
                           "(the order depends on neither)")
        C.report([table], C.machine(), args.markdown, args.json)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
