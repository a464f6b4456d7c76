"""Compact sample encodings (`shards build --feature-encoding ... --cls-prob-encoding ...`):
what each costs and what it changes, against float16 shards of the same input.

    python bench/data_encodings.py --quick              # k sweep + per-encoding figures, ~1-2 min
    python bench/data_encodings.py --learning           # + demo pretraining per encoding (1 rank, ~2 min a run)
    python bench/data_encodings.py --topk-from runs/cc/manifest.json   # k sweep on a real float16 shard set

Measured:
- top-k sweep: for k in 1..64, the kept mass M of each region's k largest classes; the decoded
  target q (top-k renormalised) has KL(q || p) = -log M and total variation 1 - M (KL(p || q) is
  infinite: q is zero off the kept classes). On three families of distributions: the synthetic
  generator's (data/synthetic.py: 0.6-0.9 on one class, 20% spread by a Dirichlet(0.05)), a
  flatter stress family (top class 0.2-0.9, the rest 70% on 10 related classes and 30% spread over
  all 1600: a long tail the synthetic lacks), and, with `--topk-from`, a real float16 shard set.
- per encoding, CC-sized samples (36 regions) built by the real builder from one synthetic input:
  bytes per sample (tar bytes / samples); decode us/sample (`sample.decode`, one thread; the
  data_bench stage); per-worker pipeline samples/s (`build_pretrain_loader`, 1 DataLoader
  worker, page cache: data_bench.pipelines); the decoded target's KL(q || p16) per region
  (mean/max) against the float16 set; the features' round-trip error against the float16 set:
  max |x' - x|, that over the region's absmax, and the mean |x' - x| over the mean |x|.
- `--learning`: the demo's pretraining (its config and DeepSpeed settings, 640 images x 12
  regions, 1 rank) on shards of each encoding built from the same synthetic input, same seed and
  number of updates; masked-region loss (KL, `train/masked_img_loss`) and alignment accuracy,
  final (mean of the last 3 logs) and mean over the run, per training seed; then each trained
  model on the float16 shards with fixed masking: the masked-region KL to the FULL target (a
  top-k run's training loss is a KL to its own truncated target: only this compares fairly) and
  the alignment accuracy.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import data_bench  # noqa: E402

from vilbert_ds.data.encoding import Encoding, kept_mass  # noqa: E402

# "float16" is the reference; the compact ones pair an 8-bit feature code with top-k cls_prob
VARIANTS = {
    "float16": Encoding(),
    "int8 + topk:16": Encoding("int8", 16),
    "e4m3 + topk:16": Encoding("e4m3", 16),
    "float16 + topk:16": Encoding("float16", 16),
    "int8 + topk:4": Encoding("int8", 4),
    "int8 + topk:32": Encoding("int8", 32),
    "int8 + topk:64": Encoding("int8", 64),
}
LEARNING_VARIANTS = ("float16", "int8 + topk:16", "e4m3 + topk:16", "int8 + topk:4", "int8 + topk:64")
KS = (1, 2, 4, 8, 16, 32, 64)


# ---------------------------------------------------------------------------------------------
# top-k: kept mass on three families of class distributions


def synthetic_rows(images: int, boxes: int = 36) -> np.ndarray:
    """float32 [images * boxes, 1601]: the synthetic generator's cls_prob."""
    from vilbert_ds.data.synthetic import SyntheticSpec, SyntheticWorld

    world = SyntheticWorld(SyntheticSpec(num_images=images, num_boxes=boxes, seed=0))
    return np.concatenate([r.cls_prob for r, _ in world.images()])


def stress_rows(n: int, classes: int = 1601, seed: int = 0) -> np.ndarray:
    """float32 [n, classes]: a flatter, long-tailed family (not measured from a detector): top
    class U(0.2, 0.9); of the rest, 70% on 10 related classes (Dirichlet(1)) and 30% spread over
    every class (Dirichlet(1) over all: a tail of ~1600 small values)."""
    rng = np.random.default_rng(seed)
    p = np.zeros((n, classes), np.float64)
    rest = 1 - rng.uniform(0.2, 0.9, n)
    for i in range(n):
        ids = rng.choice(classes, 11, replace=False)
        p[i] = 0.3 * rest[i] * rng.dirichlet(np.ones(classes))
        p[i, ids[1:]] += 0.7 * rest[i] * rng.dirichlet(np.ones(10))
        p[i, ids[0]] += 1 - rest[i]
    return p.astype(np.float32)


def shard_rows(url: str, max_samples: int, storage_options: dict | None = None) -> np.ndarray:
    """cls_prob rows of the first `max_samples` samples of a shard set (any encoding; a top-k
    set gives its already truncated rows, so measure a float16 set)."""
    from vilbert_ds.data.manifest import load_source
    from vilbert_ds.data.stream import ReadOptions, StreamStats, read_samples

    m = load_source(url, storage_options or {})
    opts = ReadOptions(storage_options=storage_options or {}, chunk_bytes=8 << 20, parallel=4, retries=2,
                       backoff_s=0.5, on_error="fail", feature_dim=m.feature_dim, num_classes=m.num_classes)
    rows, seen = [], 0
    for shard in m.shards:
        ids = list(range(min(shard.count, max_samples - seen)))
        for s in read_samples(shard, ids, opts, StreamStats(), set()).values():
            if s.cls_prob is None:
                raise SystemExit(f"{url}: the set has no cls_prob")
            rows.append(s.cls_prob.astype(np.float32))
        seen += len(ids)
        if seen >= max_samples:
            break
    return np.concatenate(rows)


def topk_sweep(rows: np.ndarray, ks=KS) -> dict[int, dict[str, float]]:
    """k -> mean/max KL(q || p) = -log M and mean/max tail mass 1 - M, and top-1 mean."""
    out = {}
    for k in ks:
        m = kept_mass(rows, k)
        kl = -np.log(np.maximum(m, 1e-12))
        out[k] = {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "tail_mean": float((1 - m).mean()),
                  "tail_max": float((1 - m).max())}
    return out


# ---------------------------------------------------------------------------------------------
# per encoding: bytes, decode cost, pipeline rate, fidelity


def build_variants(root: Path, images: int, boxes: int, variants: dict[str, Encoding], *, max_count: int,
                   seed: int = 0) -> dict[str, Path]:
    """One synthetic input, a shard set per encoding (the real builder). name -> manifest path."""
    from vilbert_ds.data.formats import Captions, TsvInput
    from vilbert_ds.data.synthetic import SyntheticSpec, write_tsv
    from vilbert_ds.data.writer import BuildConfig, build

    inputs = write_tsv(str(root / "in"), SyntheticSpec(num_images=images, num_boxes=boxes, seed=seed))
    out = {}
    for name, enc in variants.items():
        d = root / name.replace(" ", "").replace("+", "_").replace(":", "")
        build(TsvInput(inputs["features"]), Captions.load(inputs["captions_cc"]),
              BuildConfig(output=str(d), prefix="cc", max_count=max_count, progress=False, encoding=enc, rebuild=True))
        out[name] = d / "manifest.json"
    shutil.rmtree(root / "in")
    return out


def _all_samples(manifest: Path) -> dict:
    from vilbert_ds.data.manifest import load_source
    from vilbert_ds.data.stream import ReadOptions, StreamStats, read_samples

    m = load_source(str(manifest))
    opts = ReadOptions(storage_options={}, chunk_bytes=8 << 20, parallel=1, retries=0, backoff_s=0, on_error="fail",
                       feature_dim=m.feature_dim, num_classes=m.num_classes)
    return {s.key: s for shard in m.shards for s in read_samples(shard, list(range(shard.count)), opts, StreamStats(),
                                                                  set()).values()}


def fidelity(ref: dict, got: dict) -> dict[str, float]:
    """Decoded arrays of `got` against the float16 set `ref` (same keys)."""
    kl, tv, err_max, err_rel_region, abs_sum, ref_sum, count = [], [], 0.0, 0.0, 0.0, 0.0, 0
    for key, r in ref.items():
        s = got[key]
        x, y = r.features.astype(np.float64), s.features.astype(np.float64)
        err = np.abs(y - x)
        absmax = np.abs(x).max(axis=1, keepdims=True)
        err_max = max(err_max, float(err.max()))
        err_rel_region = max(err_rel_region, float((err / np.maximum(absmax, 1e-12)).max()))
        abs_sum += float(err.sum())
        ref_sum += float(np.abs(x).sum())
        count += x.size
        p, q = r.cls_prob.astype(np.float64), s.cls_prob.astype(np.float64)
        p /= p.sum(axis=1, keepdims=True)
        kept = q > 0
        kl.append((np.where(kept, q * (np.log(np.where(kept, q, 1)) - np.log(np.where(kept, p, 1))), 0)).sum(axis=1))
        tv.append(0.5 * np.abs(q - p).sum(axis=1))
    kl_all, tv_all = np.concatenate(kl), np.concatenate(tv)
    return {"kl_mean": float(kl_all.mean()), "kl_max": float(kl_all.max()), "tv_mean": float(tv_all.mean()),
            "tv_max": float(tv_all.max()), "feat_err_max": err_max, "feat_err_max_over_absmax": err_rel_region,
            "feat_err_mean_over_mean_abs": abs_sum / max(ref_sum, 1e-12)}


def per_encoding(root: Path, images: int, repeats: int, batch: int = 32) -> dict[str, dict[str, Any]]:
    """Bytes, decode cost, 1-worker pipeline rate and fidelity of each of VARIANTS (36 regions)."""
    import torch

    from vilbert_ds.assets import minilm_dir
    from vilbert_ds.data.cc_batches import PretrainCollate
    from vilbert_ds.data.config import DataConfig
    from vilbert_ds.data.manifest import load_source

    torch.set_num_threads(1)  # what a DataLoader worker process runs with
    sets = build_variants(root, images, 36, VARIANTS, max_count=math.ceil(images / 4))
    ref = _all_samples(sets["float16"])
    vocab = str(minilm_dir())
    out: dict[str, dict[str, Any]] = {}
    for name, manifest_path in sets.items():
        manifest = load_source(str(manifest_path))
        tars = [manifest_path.parent / s.name for s in manifest.shards]

        def make_cfg(url=str(manifest_path), **kw):
            return DataConfig(train=url, vocab=vocab, max_regions=36, shuffle_buffer=240, read_chunk_bytes="8MiB",
                              readahead_chunks=4, **kw)

        collate = PretrainCollate(make_cfg(), 0, manifest.caption_pool, manifest.num_classes)
        collate.setup()
        stages = data_bench.stage_rates(manifest, collate, chunk=8 << 20, parallel=4, batch=batch, repeats=repeats,
                                        tars=tars)
        pipes = data_bench.pipelines(make_cfg, n=manifest.num_samples, batch=batch, repeats=repeats, workers=(1,))
        out[name] = {
            "encoding": VARIANTS[name].to_json(),
            "bytes_per_sample": manifest.num_bytes / manifest.num_samples,
            "decode_us_per_sample": stages["decode"]["us_per_sample"],
            "collate_us_per_sample": stages["collate"]["us_per_sample"],
            "pipeline_per_worker": pipes["workers 1"]["per_worker"],
            "pipeline_cpu_ms_per_sample": pipes["workers 1"]["cpu_ms_per_sample"],
            **fidelity(ref, _all_samples(manifest_path)),
        }
    return out


# ---------------------------------------------------------------------------------------------
# learning: the demo's pretraining per encoding


def _metrics(run_dir: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "train/masked_img_loss" in r]


def evaluate_full_targets(run_dir: Path, cfg: dict[str, Any], manifest: Path, batches: int = 20) -> dict[str, float]:
    """The trained model of `run_dir` on the FLOAT16 shards, `batches` batches of 16 with fixed
    masking (loader seed 0: the same masked tokens/regions for every model): the masked-region KL
    to the full detector distribution and the alignment accuracy. The training loss of a top-k
    run is a KL to its own (truncated) target, so only this figure compares runs fairly."""
    import torch

    from vilbert_ds.data.cc_batches import build_pretrain_loader
    from vilbert_ds.data.config import DataConfig
    from vilbert_ds.model_factory import get_model
    from vilbert_ds.objectives import PretrainObjective

    model = get_model(str(run_dir), config=cfg["model"]["config"], overrides=cfg["model"]["overrides"]).eval()
    objective = PretrainObjective(model)
    data = DataConfig(**{**cfg["data"], "train": str(manifest), "num_workers": 0})
    loader = build_pretrain_loader(data, rank=0, world_size=1, micro_batch_size=16, seed=0)
    loader.set_epoch(0)
    mr, correct, picked = [], 0.0, 0.0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == batches:
                break
            _, metrics = objective(batch.to("cpu", torch.float32))
            mr.append(float(metrics["masked_img_loss"]))
            correct += float(metrics["alignment_acc"].num)
            picked += float(metrics["alignment_acc"].den)
    loader.close()
    return {"masked_region_loss_full_target": float(np.mean(mr)), "alignment_acc_eval": correct / max(picked, 1)}


def learning(root: Path, steps: int, seeds: tuple[int, ...], timeout: float,
             variants: tuple[str, ...] = LEARNING_VARIANTS) -> dict[str, dict[str, Any]]:
    """The demo's pretraining (config, DeepSpeed settings, 640 images x 12 regions, 8 classes) on
    1 rank for `steps` updates, per encoding and training seed; shards from one synthetic input
    (the same for every call: float16 is always built, it is the evaluation set)."""
    import yaml

    from vilbert_ds.assets import minilm_dir
    from vilbert_ds.commands.demo import DEMO_DS_CONFIG
    from vilbert_ds.config import PACKAGED_CONFIGS

    sets = build_variants(root / "shards", 640, 12, {k: VARIANTS[k] for k in ("float16", *variants)}, max_count=64)
    (root / "ds_config.json").write_text(json.dumps(DEMO_DS_CONFIG, indent=2))
    env = dict(os.environ, WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu",
               OMP_NUM_THREADS="1")
    out: dict[str, dict[str, Any]] = {}
    for name in variants:
        manifest = sets[name]
        for seed in seeds:
            run_dir = root / "runs" / f"{manifest.parent.name}-seed{seed}"
            cfg = yaml.safe_load((PACKAGED_CONFIGS / "demo.yaml").read_text())
            cfg["data"].update(train=str(manifest), vocab=str(minilm_dir()))
            cfg["train"].update(output_dir=str(run_dir), total_steps=steps, save_every=steps, seed=seed)
            cfg["metrics"].update(log_every=20, wandb="disabled")
            cfg_path = root / f"{manifest.parent.name}-seed{seed}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            t0 = time.perf_counter()
            with open(root / "train.log", "a") as log:
                rc = subprocess.run([sys.executable, "-m", "vilbert_ds.pretrain", "--config", str(cfg_path),
                                     "--deepspeed", str(root / "ds_config.json")], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, timeout=timeout).returncode
            if rc:
                raise RuntimeError(f"pretraining {name} seed {seed} failed (exit {rc}); see {root / 'train.log'}")
            rows = _metrics(run_dir)
            mr = [r["train/masked_img_loss"] for r in rows]
            acc = [r["train/alignment_acc"] for r in rows]
            out[f"{name} | seed {seed}"] = {
                "encoding": name, "seed": seed, "steps": steps, "seconds": time.perf_counter() - t0,
                "masked_region_loss_final": float(np.mean(mr[-3:])), "masked_region_loss_mean": float(np.mean(mr)),
                "alignment_acc_final": float(np.mean(acc[-3:])), "alignment_acc_mean": float(np.mean(acc)),
                **evaluate_full_targets(run_dir, cfg, sets["float16"]),
                "curve": {"step": [r["step"] for r in rows], "masked_region_loss": mr, "alignment_acc": acc},
            }
            print(f"[learning] {name} seed {seed}: {json.dumps({k: v for k, v in out[f'{name} | seed {seed}'].items() if k != 'curve'})}",
                  file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# report


def tables(r: dict[str, Any]) -> str:
    lines = []
    for family, sweep in r["topk"].items():
        lines += [f"top-k kept mass, {family} ({sweep['regions']} regions): KL(q||p) = -log M, tail = 1 - M",
                  "    k   KL mean   KL max   tail mean   tail max"]
        for k, v in sweep["k"].items():
            lines.append(f"  {k:>3}  {v['kl_mean']:8.4f} {v['kl_max']:8.4f}  {v['tail_mean']:9.4f} {v['tail_max']:9.4f}")
        lines.append("")
    if "encodings" in r:
        lines += ["per encoding (36 regions; fidelity against the float16 set of the same input):",
                  f"  {'encoding':<18} {'KB/sample':>9} {'decode us':>9} {'worker/s':>9} {'KL mean':>8} {'KL max':>8} "
                  f"{'err max':>8} {'max/absmax':>10} {'mean rel':>8}"]
        for name, v in r["encodings"].items():
            lines.append(f"  {name:<18} {v['bytes_per_sample'] / 1e3:9.1f} {v['decode_us_per_sample']:9.0f} "
                         f"{v['pipeline_per_worker']:9.0f} {v['kl_mean']:8.4f} {v['kl_max']:8.4f} "
                         f"{v['feat_err_max']:8.4f} {v['feat_err_max_over_absmax']:10.4f} "
                         f"{v['feat_err_mean_over_mean_abs']:8.4f}")
        lines.append("")
    if "learning" in r:
        lines += ["demo pretraining, 1 rank (masked-region loss = KL to the decoded target; final = last 3 logs):",
                  f"  {'encoding':<18} {'seed':>4} {'MR loss final':>13} {'MR loss mean':>12} {'align final':>11} "
                  f"{'align mean':>10} {'MR KL to full p':>15} {'align eval':>10}"]
        for v in r["learning"].values():
            lines.append(f"  {v['encoding']:<18} {v['seed']:>4} {v['masked_region_loss_final']:13.4f} "
                         f"{v['masked_region_loss_mean']:12.4f} {v['alignment_acc_final']:11.3f} "
                         f"{v['alignment_acc_mean']:10.3f} {v['masked_region_loss_full_target']:15.4f} "
                         f"{v['alignment_acc_eval']:10.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="128 samples per set, 1 repeat")
    p.add_argument("--images", type=int, default=256, help="samples per per-encoding set")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-encodings", action="store_true", help="only the top-k sweep (and --learning)")
    p.add_argument("--learning", action="store_true", help="also the demo pretraining per encoding")
    p.add_argument("--steps", type=int, default=300, help="updates per learning run")
    p.add_argument("--seeds", default="42,43", help="training seeds per learning run")
    p.add_argument("--learn-variants", default=",".join(LEARNING_VARIANTS),
                   help=f"encodings trained with --learning, comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per learning run")
    p.add_argument("--topk-from", default=None, help="also sweep k on this float16 shard set (manifest URL)")
    p.add_argument("--topk-samples", type=int, default=512)
    p.add_argument("--storage-options", default=None, help="fsspec options as JSON for --topk-from")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    images, repeats = (128, 1) if args.quick else (args.images, args.repeats)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="vilbert-encodings-bench-"))
    r: dict[str, Any] = {"command": "python bench/data_encodings.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    families = {"synthetic generator": synthetic_rows(64), "flatter stress family": stress_rows(2304)}
    if args.topk_from:
        families[f"shards {args.topk_from}"] = shard_rows(args.topk_from, args.topk_samples,
                                                          json.loads(args.storage_options or "{}"))
    r["topk"] = {name: {"regions": int(rows.shape[0]), "k": topk_sweep(rows)} for name, rows in families.items()}
    try:
        if not args.no_encodings:
            r["encodings"] = per_encoding(root / "enc", images, repeats)
        if args.learning:
            names = tuple(v.strip() for v in args.learn_variants.split(","))
            unknown = [v for v in names if v not in VARIANTS]
            if unknown:
                raise SystemExit(f"--learn-variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
            r["learning"] = learning(root / "learn", args.steps, tuple(int(s) for s in args.seeds.split(",")),
                                     args.timeout, names)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print(tables(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
