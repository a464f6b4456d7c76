"""Do the task pipelines carry the image? Multi-task training on synthetic tasks whose answers
depend on the region features, against the best text-only baseline.

    python bench/tasks_region_dependence.py --out /tmp/rd_bench            # ~3-5 min on 2 CPU cores
    python bench/tasks_region_dependence.py --out /tmp/rd_orig --recipe original   # the 12-in-1 optimizer recipe

Writes synthetic VQA v2 / GQA / SNLI-VE / NLVR2 files in their public formats
(`vilbert_ds.tasks.synthetic_qa`: two coloured objects per image, questions about them), builds the
task shards, trains `vilbert-ds multitask` (1 CPU rank, tiny model) and compares each task's final validation score with `text_only_baseline` (the training split's most
frequent answer for each question text: the best any model that ignores the image can expect).
Prints a markdown table and writes `<out>/results.json`.

Recipes: `bench` (DeepSpeed ZeRO-1, AdamW with bias correction, betas (0.9, 0.999), eps 1e-6,
clipping 1.0, lr 5e-4, heads 2e-3: what the tiny model needs in 400 iterations) and `original`
(ds_configs/zero2_12in1.json: the original's AdamW without bias correction, no clipping, base lr
"auto" = the tasks' smallest lr, heads 1e-4); --lr / --head-lr override either.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

TASKS = ["vqa", "gqa", "snli_ve", "nlvr2"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=200, help="images per split")
    p.add_argument("--questions", type=int, default=3, help="questions per image")
    p.add_argument("--iterations", type=int, default=400, help="round-robin iterations (one update per task each)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--recipe", choices=("bench", "original"), default="bench",
                   help="optimizer recipe: bench (lr 5e-4, heads 2e-3) or original (ds_configs/zero2_12in1.json)")
    p.add_argument("--lr", type=float, default=None, help="base lr (trunk); default 5e-4 (bench) or the tasks' "
                   "smallest lr (original)")
    p.add_argument("--head-lr", type=float, default=None, help="lr of the vil_* heads; default 2e-3 (bench), 1e-4 (original)")
    p.add_argument("--ds", action="append", default=[], metavar="KEY=VALUE",
                   help="DeepSpeed config override, repeatable (e.g. zero_optimization.stage=1)")
    p.add_argument("--init-range", type=float, default=0.1,
                   help="initializer_range of the tiny model (0.02, the original's, leaves it on the fused-product "
                        "plateau for hundreds of updates at this size)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from vilbert_ds.tasks.build import build_task
    from vilbert_ds.tasks.registry import load_registry
    from vilbert_ds.tasks.synthetic_qa import SyntheticTaskSpec, make_synthetic_tasks, text_only_baseline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    registry_path = make_synthetic_tasks(out / "data", TASKS, SyntheticTaskSpec(images=args.images,
                                                                                 questions_per_image=args.questions,
                                                                                 seed=args.seed))
    registry = load_registry(registry_path)
    for task in TASKS:
        build_task(registry, task)
    build_s = time.time() - t0
    ds_path, ds_overrides = out / "ds.json", []
    if args.recipe == "bench":
        ds = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": args.lr or 5e-4, "betas": [0.9, 0.999], "eps": 1e-6,
                                                        "weight_decay": 0.01}},
              "zero_optimization": {"stage": 1}}
        ds_path.write_text(json.dumps(ds))
    else:
        ds_path = Path(__file__).resolve().parents[1] / "ds_configs" / "zero2_12in1.json"
        ds_overrides = [f"ds.optimizer.params.lr={args.lr}"] if args.lr else []
    head_lr = args.head_lr or (2e-3 if args.recipe == "bench" else 1e-4)
    run_dir = out / "run"
    cfg = {"tasks": {"registry": str(registry_path), "batch_size": {t: args.batch for t in TASKS},
                     "eval_batch_size": {t: 50 for t in TASKS}, "evaluate": False, "head_lr": head_lr},
           "data": {"num_workers": 0},
           "model": {"config": "tiny", "overrides": {"initializer_range": args.init_range}},
           "train": {"output_dir": str(run_dir), "total_steps": args.iterations, "save_every": 10**6,
                     "seed": args.seed, "timeout_s": 600},
           "metrics": {"log_every": 50, "wandb": "disabled", "tensorboard": False, "progress_bar": False}}
    (out / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    t1 = time.time()
    subprocess.run([sys.executable, "-m", "vilbert_ds.multitask", "--tasks", ",".join(TASKS), "--config",
                    str(out / "run.yaml"), "--deepspeed", str(ds_path), "--resume", "auto", *ds_overrides,
                    *(f"ds.{o}" for o in args.ds)],
                   check=True, env=env)
    train_s = time.time() - t1
    rows = []
    for task in TASKS:
        split = registry[task].splits.val
        score = json.loads((run_dir / "eval" / f"{task}_{split}_metrics.json").read_text())["score"]
        base = text_only_baseline(registry, task)
        rows.append({"task": task, "split": split, "score": round(score, 4), "text_only_baseline": round(base, 4),
                     "margin": round(score - base, 4)})
    result = {"rows": rows, "args": vars(args), "build_s": round(build_s, 1), "train_s": round(train_s, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print("| task | val split | score after training | text-only baseline | margin |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['split']} | {r['score']:.3f} | {r['text_only_baseline']:.3f} | {r['margin']:+.3f} |")
    print(f"build {build_s:.0f} s, training + eval {train_s:.0f} s ({args.iterations} iterations, recipe {args.recipe}, "
          f"lr {args.lr or ('5e-4' if args.recipe == 'bench' else 'auto')}, heads {head_lr:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
