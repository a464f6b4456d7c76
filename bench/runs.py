"""Real, short pretraining runs for the start-up (Q5) and data-wait (Q4) questions.

`prepare_shards` builds CC-sized synthetic shards (36 regions of 2048-d float16 features and
1601-way class distributions per image: ~270 KB per sample) through the real shard builder;
`launch_pretrain` starts `python -m vilbert_ds.pretrain` (1 rank) or the deepspeed launcher
(N ranks) on them with the packaged `demo` model (MiniLM text stream, small vision stream) and
the real streaming loader, and reads the run's metrics.jsonl:

- launch to first step: wall seconds from the launch to the end of the first optimizer step
  (the `time` of the step-1 metrics row);
- data wait: `perf/data_wait_frac` of the steps after the first (time the trainer blocked on
  the loader / step time), and `perf/samples_per_s`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def prepare_shards(root: Path, *, images: int = 96, boxes: int = 36) -> Path:
    """Synthetic CC-sized shards under `root` (built once; returns the manifest)."""
    manifest = root / "shards" / "manifest.json"
    if manifest.exists():
        return manifest
    from vilbert_ds.data.formats import Captions, TsvInput
    from vilbert_ds.data.synthetic import SyntheticSpec, write_tsv
    from vilbert_ds.data.writer import BuildConfig, build

    inputs = write_tsv(str(root / "in"), SyntheticSpec(num_images=images, num_boxes=boxes, seed=0))
    build(TsvInput(inputs["features"]), Captions.load(inputs["captions_cc"]),
          BuildConfig(output=str(root / "shards"), prefix="cc", max_count=max(8, images // 4), progress=False,
                      rebuild=True))  # inputs rewritten: replace a half-built set of an earlier run
    return manifest


@dataclass
class RunResult:
    ranks: int
    steps: int
    launch_to_first_step_s: float
    step_s: float  # median perf/step_s after the first step
    samples_per_s: float  # median, all ranks
    data_wait_frac: float  # mean after the first step
    wall_s: float  # whole launch, incl. the final checkpoint and exit
    launched_at: float  # unix time of the launch
    log: str = ""  # the launch's stdout + stderr


def launch_pretrain(root: Path, manifest: Path, *, ranks: int, steps: int, micro_batch: int = 8, workers: int = 1,
                    extensions_dir: str | None = None, timeout_s: float = 600.0, name: str | None = None) -> RunResult:
    from vilbert_ds.assets import minilm_dir

    name = name or f"run_{ranks}r_{int(time.time() * 1000) % 10**8}"
    out_dir = root / name
    overrides = [
        f"data.train={manifest}", f"data.vocab={minilm_dir()}", "data.max_seq_length=36", "data.max_regions=36",
        f"data.num_workers={workers}", f"train.output_dir={out_dir}",
        f"train.total_steps={steps}", f"train.save_every={steps + 1}", "train.keep_last=1",
        "metrics.log_every=1", "metrics.wandb=disabled", "metrics.tensorboard=false", "metrics.progress_bar=false",
        f"ds.train_batch_size={micro_batch * ranks}", f"ds.train_micro_batch_size_per_gpu={micro_batch}",
    ]
    args = ["--config", "demo", "--deepspeed", str(C.REPO / "ds_configs" / "cpu_small.json"), *overrides]
    if ranks == 1:
        cmd = [sys.executable, "-m", "vilbert_ds.pretrain", *args]
    else:
        with C.socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(port),
               "--module", "vilbert_ds.pretrain", *args]
    # CPU ranks even on a GPU machine: 2 ranks need 2 devices, and the start-up figures compare.
    env = C.child_env(PYTHONUNBUFFERED="1", WANDB_MODE="offline", DS_ACCELERATOR="cpu",
                      OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // ranks))))
    if extensions_dir is not None:
        env["TORCH_EXTENSIONS_DIR"] = extensions_dir
    launched = time.time()
    proc = subprocess.Popen(cmd, cwd=C.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        raise RuntimeError(f"pretraining launch timed out after {timeout_s:.0f}s: {' '.join(cmd)}\n"
                           f"{log[-3000:]}") from None
    wall = time.time() - launched
    metrics = out_dir / "metrics.jsonl"
    if proc.returncode != 0 or not metrics.exists():
        raise RuntimeError(f"pretraining launch failed ({proc.returncode}): {' '.join(cmd)}\n{log[-4000:]}")
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    steps_rows = sorted((r for r in rows if "perf/samples_per_s" in r), key=lambda r: r["step"])
    if not steps_rows:
        raise RuntimeError(f"{metrics}: no step rows")
    later = steps_rows[1:] or steps_rows
    return RunResult(
        ranks=ranks, steps=steps, launch_to_first_step_s=steps_rows[0]["time"] - launched,
        step_s=C.median(r["perf/step_s"] for r in later),
        samples_per_s=C.median(r["perf/samples_per_s"] for r in later),
        data_wait_frac=sum(r["perf/data_wait_frac"] for r in later) / len(later), wall_s=wall, launched_at=launched,
        log=log,
    )


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="vilbert-ds-bench-runs-"))
