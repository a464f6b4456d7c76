"""`vilbert-ds plot RUN [--out PNG]`: the curves of a run (from its metrics.jsonl) as one PNG, for
people who work without wandb/TensorBoard.

Panels: total and per-objective losses, alignment accuracy (pretraining); per task (one line
each) the training loss, training score, validation score and sampling probability (multi-task
and fine-tuning); learning rate and grad norm, throughput (samples/s, data-wait fraction).
Keys that a run does not have are skipped.
"""
from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

PANELS = (  # (title, keys, log scale); "*" stands for every task of a run
    ("losses", ("train/loss", "train/masked_lm_loss", "train/masked_img_loss", "train/alignment_loss"), False),
    ("alignment accuracy", ("train/alignment_acc",), False),
    ("task loss", ("train/*/loss",), True),
    ("task training score", ("train/*/score",), False),
    ("validation score", ("val/*/score",), False),
    ("sampling probability", ("sampler/*/prob",), False),
    ("learning rate", ("opt/lr", "opt/lr_min_group"), False),
    ("grad norm", ("opt/grad_norm",), True),
    ("samples / s (all ranks)", ("perf/samples_per_s",), False),
    ("data wait fraction", ("perf/data_wait_frac",), False),
)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the PNG and return its path (default: RUN/metrics.png)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from ..metrics import read_metrics

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    present = sorted({k for r in rows for k in r})
    panels = [(title, [k for p in keys for k in present if fnmatch.fnmatchcase(k, p) and k.count("/") == p.count("/")],
               log) for title, keys, log in PANELS]
    panels = [p for p in panels if p[1]]
    if not panels:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no training metrics to plot")
    cols = 2
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(11, 3.2 * nrows), squeeze=False)
    for ax, (title, keys, log) in zip(axes.flat, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            label = key.split("/")[1] if key.count("/") == 2 else key.split("/", 1)[1]  # the task, or the metric
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, linewidth=1.2,
                    marker="o" if len(pts) < 20 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if log:
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(str(run_dir), fontsize=10)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "metrics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run directory (with metrics.jsonl)")
    parser.add_argument("--out", default=None, help="PNG path (default: RUN/metrics.png)")


def main(args: argparse.Namespace) -> int:
    try:
        path = plot_run(args.run, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"vilbert-ds plot: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
