"""Question 7 - real training launches: the throughput a `vilbert-ds pretrain` / `multitask` run
logged, read back from its run directory (metrics.jsonl, config.yaml, ds_config.json).

    python bench/train_runs.py --pretrain runs/pretrain --multitask runs/multitask --markdown --json runs.json

bench/gpu_session.sh launches both on synthetic shards on a lent GPU and saves this command's
JSON beside the model-step figures; `python bench/run.py --gpu --from-json ...` puts them in the
doc. The first logged window of a run holds its warm-up (CUDA/cuDNN set-up, allocator growth,
loader start), so the steady figures are medians over the later logged rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

PRETRAIN_COLUMNS = ["run", "config", "precision", "ZeRO", "micro-batch", "workers", "steps", "samples/s", "tokens/s",
                    "step ms", "TFLOP/s", "MFU", "data wait %", "peak GiB", "ckpt save s"]
MULTITASK_COLUMNS = ["run", "config", "precision", "ZeRO", "tasks", "batch per task", "workers per task", "iterations",
                     "samples/s", "tokens/s", "iteration ms", "TFLOP/s", "MFU", "data wait %", "peak GiB"]


def read_run(run_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """(metrics rows, training config, DeepSpeed config) of a run directory."""
    from vilbert_ds.metrics import read_metrics

    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    ds = json.loads((run_dir / "ds_config.json").read_text(encoding="utf-8"))
    return read_metrics(run_dir), cfg, ds


def _steady(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    logged = [r for r in rows if key in r]
    return logged[1:] or logged


def _precision(ds: dict[str, Any]) -> str:
    return "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"


def _model(cfg: dict[str, Any]) -> str:
    return C.SHORT_NAMES.get(cfg["model"]["config"], cfg["model"]["config"])


def _steady_figures(run_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(metrics rows, config, DeepSpeed config, figures) of a run: the columns every kind of run
    shares, as the one Trainer logs them (medians over the logged windows after the first)."""
    rows, cfg, ds = read_run(run_dir)
    steady = _steady(rows, "perf/samples_per_s")
    if not steady:
        raise ValueError(f"{run_dir}: no perf/samples_per_s rows in metrics.jsonl")

    def med(key: str, scale: float = 1.0) -> float | None:
        values = [r[key] for r in steady if key in r]
        return scale * C.median(values) if values else None

    figures = {"run": Path(run_dir).name, "config": _model(cfg), "precision": _precision(ds),
               "ZeRO": ds.get("zero_optimization", {}).get("stage", 0), "last step": max(r["step"] for r in steady),
               "samples/s": med("perf/samples_per_s"), "tokens/s": med("perf/tokens_per_s"),
               "step ms": med("perf/step_s", 1e3), "TFLOP/s": med("perf/tflops"), "MFU": med("perf/mfu"),
               "data wait %": med("perf/data_wait_frac", 100.0),
               "peak GiB": max(r.get("mem/peak_gib_per_rank", 0.0) for r in steady)}
    return rows, cfg, ds, figures


def _columns(figures: dict[str, Any], columns: list[str], renamed: dict[str, str], **extra: Any) -> dict[str, Any]:
    """One table row: `figures` under the table's column names (`renamed`: column -> figure)."""
    values = {**figures, **extra}
    return {c: values[renamed.get(c, c)] for c in columns}


def pretrain_row(run_dir: str | Path) -> dict[str, Any]:
    rows, cfg, ds, figures = _steady_figures(run_dir)
    saves = [r["ckpt/save_s"] for r in rows if "ckpt/save_s" in r]
    return _columns(figures, PRETRAIN_COLUMNS, {"steps": "last step"},
                    **{"micro-batch": ds["train_micro_batch_size_per_gpu"], "workers": cfg["data"]["num_workers"],
                       "ckpt save s": saves[-1] if saves else None})


def multitask_row(run_dir: str | Path) -> dict[str, Any]:
    """One Trainer logs every kind of run alike (issue 10): samples/s, tokens/s, iteration time,
    TFLOP/s, MFU, data wait and peak memory per logged window, over every task's batches."""
    rows, cfg, ds, figures = _steady_figures(run_dir)
    tasks = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("train/") and k.endswith("/loss")})
    batches = cfg["tasks"]["batch_size"]
    batch = sum(int(batches[t]) for t in tasks) / len(tasks) if tasks and all(t in batches for t in tasks) else None
    return _columns(figures, MULTITASK_COLUMNS, {"iterations": "last step", "iteration ms": "step ms"},
                    **{"tasks": ",".join(tasks), "batch per task": batch,
                       "workers per task": cfg["data"]["num_workers"]})


def run(pretrain: list[str] = (), multitask: list[str] = ()) -> list[C.Table]:
    tables = []
    if pretrain:
        table = C.Table("Q7a pretraining launches (vilbert_ds.pretrain, 1 rank, synthetic CC-sized shards)",
                        PRETRAIN_COLUMNS, rows=[pretrain_row(d) for d in pretrain])
        table.notes += [
            "medians over the logged windows after the first (metrics.jsonl); TFLOP/s and MFU as the trainer "
            "logs them (analytic FLOPs of docs/PERFORMANCE.md section 1, dense bf16 peak of the device)",
            "data wait = time the trainer blocked on the loader / step time (perf/data_wait_frac); "
            "peak = mem/peak_gib_per_rank (torch.cuda.max_memory_allocated on a GPU); ckpt save = the final "
            "checkpoint (weights + optimizer state)",
        ]
        tables.append(table)
    if multitask:
        table = C.Table("Q7b multi-task launches (vilbert_ds.multitask, 1 rank, synthetic task shards)",
                        MULTITASK_COLUMNS, rows=[multitask_row(d) for d in multitask])
        table.notes.append("one iteration = one update per task (round-robin: forward, backward, optimizer step "
                           "each); medians over the logged windows after the first; TFLOP/s and MFU from the same "
                           "analytic FLOPs as pretraining, per task shape")
        tables.append(table)
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain", nargs="*", default=[], metavar="RUN_DIR")
    parser.add_argument("--multitask", nargs="*", default=[], metavar="RUN_DIR")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    try:
        tables = run(args.pretrain, args.multitask)
    except (OSError, ValueError, KeyError) as e:
        print(f"bench/train_runs.py: {e}", file=sys.stderr)
        return 2
    if not tables:
        parser.error("name at least one run directory (--pretrain / --multitask)")
    C.report(tables, C.machine(), args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
