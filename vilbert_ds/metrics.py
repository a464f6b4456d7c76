"""Metrics: the analytic FLOP count, throughput/MFU, and one logger interface over several sinks.

Keys are `section/name`: `train/loss`, `train/masked_lm_loss`, `train/alignment_acc`, `opt/lr`,
`opt/grad_norm`, `perf/samples_per_s`, `perf/tokens_per_s`, `perf/tflops`, `perf/mfu`,
`perf/data_wait_frac`, `mem/peak_gib`, `ckpt/save_s`. Per-rank throughput keys end in `_per_rank`.

Sinks (`MetricsLogger`): JSONL and CSV always (`metrics.jsonl`, `metrics.csv` in the run
directory), TensorBoard when installed, wandb (offline by default: nothing leaves the machine
unless the user sets `metrics.wandb=online`), and a console line. Only the main rank writes;
the trainer reduces values across ranks before logging.

`python -m vilbert_ds.metrics flops --config base_6layer_6conect` prints the FLOP breakdown.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

log = logging.getLogger(__name__)

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"


# =============================================================================== FLOPs
@dataclass(frozen=True)
class FlopCount:
    """Matmul FLOPs (multiply + add = 2) of one forward pass of ONE sample, by part.

    Elementwise work (softmax, GELU, LayerNorm, residual adds, embedding lookups) is left out:
    it is < 2% of the total for the base model and is not what tensor cores spend time on.
    `train` = 3 x forward (backward costs two matmuls per forward matmul: grad wrt input and
    wrt weight); activation recomputation is *not* counted, as MFU conventionally excludes it.
    """

    parts: dict[str, float]

    @property
    def forward(self) -> float:
        return float(sum(self.parts.values()))

    @property
    def train(self) -> float:
        return 3.0 * self.forward


def _transformer_layer(tokens: int, width: int, inner: int) -> float:
    """One post-LN BERT layer over `tokens` positions (self-attention over the same positions).

    Q, K, V and output projections: 4 x 2*T*W*W; scores Q K^T and probs x V: 2 x 2*T*T*W;
    FFN: 2 x 2*T*W*inner.
    """
    return 8.0 * tokens * width * width + 4.0 * tokens * tokens * width + 4.0 * tokens * width * inner


def vilbert_flops(
    config,
    *,
    text_len: int = 36,
    regions: int = 37,
    masked_tokens: float = 0.0,
    masked_regions: float = 0.0,
    heads: Iterable[str] = ("seq_relationship",),
    task_token: bool = False,
) -> FlopCount:
    """Analytic forward FLOPs of `ViLBert` for one sample.

    Shapes: L = text_len (+1 with a task token), R = regions (incl. the global region), widths
    H (text), V (vision), C (co-attention); I, Iv the FFN widths.

    - image embeddings: 2*R*(F*V + 5*V)   (F = v_feature_size; the text embeddings are lookups)
    - each text / vision layer: see `_transformer_layer`
    - each co-attention block:
        Q/K/V of vision 3*2*R*V*C, of text 3*2*L*H*C; text->vision and vision->text attention
        2 x (2*L*R*C + 2*R*L*C) = 8*L*R*C; back-projections 2*R*C*V + 2*L*C*H;
        FFNs 4*R*V*Iv + 4*L*H*I   (`q_dense*` are never run)
    - poolers (position 0 only): 2*H*C + 2*V*C
    - heads: alignment 2*C*2; MLM on `masked_tokens` positions: 2*H*H + 2*H*vocab each;
      region head on `masked_regions`: 2*V*V + 2*V*v_target_size each; full-sequence heads when
      named in `heads` ("text_prediction", "vision_prediction").
    `masked_tokens`/`masked_regions` may be expectations (15% of the real tokens/regions).
    """
    c = config
    L = text_len + (1 if task_token else 0)
    R = regions
    H, I, V, Iv, C = c.hidden_size, c.intermediate_size, c.v_hidden_size, c.v_intermediate_size, c.bi_hidden_size
    heads = set(heads)
    parts: dict[str, float] = {}
    parts["image_embeddings"] = 2.0 * R * (c.v_feature_size * V + 5 * V)
    parts["text_layers"] = c.num_hidden_layers * _transformer_layer(L, H, I)
    parts["vision_layers"] = c.v_num_hidden_layers * _transformer_layer(R, V, Iv)
    per_block = (
        6.0 * R * V * C + 6.0 * L * H * C  # Q/K/V of both streams
        + 8.0 * L * R * C  # both cross-attentions: scores and weighted sums
        + 2.0 * R * C * V + 2.0 * L * C * H  # dense1 / dense2
        + 4.0 * R * V * Iv + 4.0 * L * H * I  # the two FFNs
    )
    parts["coattention_blocks"] = len(c.v_biattention_id) * per_block
    parts["poolers"] = 2.0 * H * C + 2.0 * V * C
    head_flops = 0.0
    if "seq_relationship" in heads or "alignment" in heads:
        head_flops += 2.0 * C * 2
    mlm = 2.0 * H * H + 2.0 * H * c.vocab_size
    region = 2.0 * V * V + 2.0 * V * c.v_target_size
    head_flops += masked_tokens * mlm + masked_regions * region
    if "text_prediction" in heads:
        head_flops += L * mlm
    if "vision_prediction" in heads:
        head_flops += R * region
    parts["heads"] = head_flops
    return FlopCount(parts)


# Dense peak TFLOP/s per device (bf16/fp16 tensor cores; fp32 = tf32 tensor cores where they
# exist). Sources: vendor data sheets, SXM parts. Unknown devices give no MFU unless
# `metrics.peak_tflops` is set.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5},
    "V100": {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7},
}


def peak_tflops(precision: str, override: float | None = None) -> float | None:
    """Peak dense TFLOP/s of one device for `precision` (fp32|bf16|fp16), or None if unknown."""
    if override:
        return float(override)
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001 - no usable device query
        return None
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table.get(precision) or None
    return None


def peak_memory_gib() -> float:
    """Peak memory of this process: device memory on GPU, max resident set size on CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


# ========================================================================= throughput
@dataclass
class ThroughputMeter:
    """Counts samples/tokens and time between `report()` calls; splits time into data wait and
    compute. Per-rank numbers; multiply by world size (or all-reduce) for totals.

    Usage: `meter.wait(seconds)` when the loader blocked, `meter.step(samples, tokens[, flops])`
    after each iteration (flops default to samples x `flops_per_sample`), `meter.report()` ->
    dict of rates since the last report.
    """

    flops_per_sample: float = 0.0  # training FLOPs of one sample (FlopCount.train)
    _t0: float = field(default_factory=time.perf_counter)
    _samples: int = 0
    _tokens: int = 0
    _flops: float = 0.0
    _steps: int = 0
    _wait: float = 0.0

    def wait(self, seconds: float) -> None:
        self._wait += seconds

    def step(self, samples: int, tokens: int, flops: float | None = None) -> None:
        self._samples += samples
        self._tokens += tokens
        self._flops += samples * self.flops_per_sample if flops is None else flops
        self._steps += 1

    def reset(self) -> None:
        self._t0, self._samples, self._tokens, self._flops, self._steps, self._wait = time.perf_counter(), 0, 0, 0.0, 0, 0.0

    def report(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        out = {
            "samples_per_s": self._samples / elapsed,
            "tokens_per_s": self._tokens / elapsed,
            "step_s": elapsed / max(self._steps, 1),
            "data_wait_frac": min(self._wait / elapsed, 1.0),
            "tflops": self._flops / elapsed / 1e12,
        }
        self.reset()
        return out


# ============================================================================== sinks
class Sink(Protocol):
    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line: {"step": s, "time": unix seconds, key: value, ...}."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self._f.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class CsvSink:
    """A wide CSV (step, time, then one column per key). A key seen for the first time widens
    the header; the file is rewritten then (rare: the key set settles after the first save)."""

    def __init__(self, path: Path):
        self.path = path
        self.columns: list[str] = ["step", "time"]
        if path.exists() and path.stat().st_size:
            with open(path, encoding="utf-8", newline="") as f:
                header = next(csv.reader(f), None)
            if header:
                self.columns = header

    def log(self, step: int, values: Mapping[str, float]) -> None:
        new = [k for k in values if k not in self.columns]
        if new:
            self._widen(new)
        row = {"step": step, "time": round(time.time(), 3), **values}
        exists = self.path.exists() and self.path.stat().st_size > 0
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            if not exists:
                writer.writeheader()
            writer.writerow(row)

    def _widen(self, new: list[str]) -> None:
        rows = []
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))
        self.columns = self.columns + new
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def close(self) -> None:
        pass


class TensorBoardSink:
    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir=str(directory))

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self._w.add_scalar(key, value, step)

    def close(self) -> None:
        self._w.close()


class WandbSink:
    """wandb in `mode` (offline by default: runs are written under the run directory and can be
    synced later with `wandb sync`). Nothing secret reaches it: the config is redacted, and so is
    the command line wandb records with the run."""

    def __init__(self, directory: Path, mode: str, project: str, name: str, config: Mapping[str, Any], resume_id: str | None):
        import wandb

        from .data.config import redact, redact_argv

        os.environ.setdefault("WANDB_SILENT", "true")
        # wandb stores the process's command line (sys.argv, read while init() hands its settings
        # over) in the run files that `wandb sync` uploads; an override such as
        # data.storage_options.secret=... must not be in it, so the redacted one stands in.
        argv = sys.argv
        sys.argv = [argv[0], *redact_argv(argv[1:])]
        try:
            self._run = wandb.init(
                mode=mode, dir=str(directory), project=project, name=name, config=redact(dict(config)),
                id=resume_id, resume="allow" if resume_id else None,
            )
        finally:
            sys.argv = argv
        self.run_id = self._run.id

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log(dict(values), step=step)

    def close(self) -> None:
        self._run.finish()


class ConsoleSink:
    """A compact line per logged row via `logging` (tqdm shows the rest): the pretraining keys,
    then per task `task[loss score val p]` (training loss and score, validation score, sampling
    probability)."""

    KEYS = ("train/loss", "train/masked_lm_loss", "train/masked_img_loss", "train/alignment_loss",
            "train/alignment_acc", "opt/lr", "perf/samples_per_s", "ckpt/save_s")
    TASK_KEYS = (("train", "loss"), ("train", "score"), ("val", "score"), ("sampler", "prob"))

    def log(self, step: int, values: Mapping[str, float]) -> None:
        shown = [f"{k.split('/', 1)[1]}={_fmt(values[k])}" for k in self.KEYS if k in values]
        tasks = sorted({k.split("/")[1] for k in values if k.count("/") == 2 and k.startswith(("train/", "val/"))})
        for task in tasks:
            parts = [f"{'p' if section == 'sampler' else 'val' if section == 'val' else name}={_fmt(values[key])}"
                     for section, name in self.TASK_KEYS if (key := f"{section}/{task}/{name}") in values]
            shown.append(f"{task}[{' '.join(parts)}]")
        if shown:
            log.info("step %d %s", step, " ".join(shown))

    def close(self) -> None:
        pass


def _fmt(v: float) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


@dataclass
class MetricsConfig:
    """`metrics:` section of the training config."""

    log_every: int = 10  # optimizer steps between logged rows (and between cross-rank reductions)
    wandb: str = "offline"  # offline | online | disabled
    wandb_project: str = "vilbert-ds"
    tensorboard: bool = True  # used when the tensorboard package is installed
    console: bool = True
    progress_bar: bool = True  # tqdm on the main rank
    peak_tflops: float | None = None  # per-device peak for MFU where the device is not in PEAK_TFLOPS

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ValueError(f"metrics.log_every={self.log_every}: must be >= 1")
        if self.wandb not in ("offline", "online", "disabled"):
            raise ValueError(f"metrics.wandb={self.wandb!r}: choose offline, online or disabled")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"metrics.peak_tflops={self.peak_tflops}: must be > 0")


class MetricsLogger:
    """Fans one `log(step, values)` call out to every sink. Build it on the main rank only;
    other ranks use `MetricsLogger.null()`."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    @classmethod
    def null(cls) -> "MetricsLogger":
        return cls([])

    @classmethod
    def for_run(cls, run_dir: str | os.PathLike, cfg: MetricsConfig, *, run_name: str = "run",
                config: Mapping[str, Any] | None = None) -> "MetricsLogger":
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        sinks: list[Sink] = [JsonlSink(run_dir / METRICS_JSONL), CsvSink(run_dir / METRICS_CSV)]
        if cfg.tensorboard:
            try:
                sinks.append(TensorBoardSink(run_dir / "tensorboard"))
            except ImportError:
                log.info("tensorboard is not installed: no TensorBoard events (JSONL/CSV still written)")
        if cfg.wandb != "disabled":
            id_file = run_dir / "wandb_run_id"  # the same wandb run continues across resumes
            resume_id = id_file.read_text().strip() if id_file.exists() else None
            try:
                sink = WandbSink(run_dir, cfg.wandb, cfg.wandb_project, run_name, config or {}, resume_id)
                id_file.write_text(sink.run_id)
                sinks.append(sink)
            except Exception as e:  # noqa: BLE001 - wandb problems must not stop training
                log.warning("wandb (%s) could not start, continuing without it: %s", cfg.wandb, e)
        if cfg.console:
            sinks.append(ConsoleSink())
        return cls(sinks)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        for sink in self.sinks:
            sink.log(step, clean)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001 - closing must not mask the run's result
                log.warning("closing %s failed: %s", type(sink).__name__, e)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of `metrics.jsonl` (the last row wins for a step logged twice, e.g. after a resume)."""
    path = Path(run_dir) / METRICS_JSONL
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a vilbert-ds run directory?)")
    by_step: dict[tuple[int, frozenset], dict] = {}
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: unreadable line skipped (a run killed mid-write)", path, n)
    for row in rows:
        by_step[(row["step"], frozenset(k for k in row if k not in ("step", "time")))] = row
    return sorted(by_step.values(), key=lambda r: (r["step"], r.get("time", 0)))


# ================================================================================= CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vilbert_ds.metrics")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("flops", help="analytic FLOPs per sample of a model config")
    p.add_argument("--config", default="base_6layer_6conect", help="preset name or original JSON")
    p.add_argument("--text-len", type=int, default=36)
    p.add_argument("--regions", type=int, default=37)
    args = parser.parse_args(argv)
    from .model import resolve_config

    cfg = resolve_config(args.config)
    count = vilbert_flops(cfg, text_len=args.text_len, regions=args.regions,
                          masked_tokens=0.15 * (args.text_len - 2), masked_regions=0.15 * (args.regions - 1))
    for part, value in count.parts.items():
        print(f"{part:>20s} {value / 1e9:10.3f} GFLOP")
    print(f"{'forward':>20s} {count.forward / 1e9:10.3f} GFLOP/sample")
    print(f"{'train (3x)':>20s} {count.train / 1e9:10.3f} GFLOP/sample")
    return 0


if __name__ == "__main__":
    sys.exit(main())
