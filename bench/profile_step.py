"""Where the time of a training step goes: torch.profiler over a few steps per engine variant
and batch, summarised as compact text (kernel launches, host syncs, GPU idle share, top ops).

    python bench/profile_step.py --gpu --out OUT                         # on a CUDA device (bench/gpu_profile.sh)
    python bench/profile_step.py --config tiny --runs bf16@4 --out DIR   # CPU: op and sync counts only

The question it answers: the bf16 step of the base model on an H200 costs ~85 ms + 0.22 ms per
sample (docs/PERFORMANCE.md section 5), i.e. at the original's batch of 64 the GPU mostly
waits. Each variant is built with bench/common.py's `build_step` (the engine assembly of Q1) and
stepped as its `run` does, with the four phases marked (`phase:to_device`, `phase:forward`,
`phase:backward`, `phase:step`) so that launches and host time can be attributed:

  bf16_zero0   bf16 at ZeRO-0, Q1's bf16 rows as measured on the H200 on 2026-12-04: DeepSpeed's
               FP16_Optimizer (FP16_UnfusedOptimizer under torch's AdamW, as at batch 256/512
               then), both of which test every gradient tensor for inf/NaN with a host sync
  bf16_ar      bf16 as ds_configs/zero1_bf16.json runs it (ZeRO-1, fp32 accumulation:
               BF16_Optimizer) with DeepSpeed's one-rank gradient all-reduce left on: the
               pretraining run of 2026-12-04
  bf16         the same with the all-reduce skipped (vilbert_ds.engine.build_engine now does it)
  bf16_pinned  bf16 with the batch in pinned host memory (data.pin_memory=true in a run)
  fp32         Q1's baseline: fp32 without TF32
  fp32_tf32    fp32 with TF32 matmuls (train.tf32=true in a run)

Per (variant, batch): the step time without the profiler (median and best of --timed steps, each
ending in a device sync, as Q1 times it), then --steps profiled steps: kernel launches, host syncs
(cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize calls, `.item()`-style reads
= aten::_local_scalar_dense, aten::nonzero), aten ops, host ms and launches per phase, GPU busy ms
and the share of the step the GPU sat idle, and the top ops by self device time and by self host
time. On the CPU (a dry run) there are no kernels: the aten op and sync-op counts still hold.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

VARIANTS = ("bf16_zero0", "bf16_ar", "bf16", "bf16_pinned", "fp32", "fp32_tf32")
PHASES = ("to_device", "forward", "backward", "step")
# Runtime / driver API calls as CUPTI names them (cudaLaunchKernel, cudaLaunchKernelExC, cuLaunchKernelEx,
# cudaGraphLaunch, ...): matched by prefix, the set differs between CUDA versions.
LAUNCH_PREFIXES = ("cudaLaunch", "cuLaunch", "cudaGraphLaunch")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")  # a device->host read each, on a GPU


def spec_for(variant: str, base: C.StepSpec) -> C.StepSpec:
    if variant == "bf16_zero0":
        return replace(base, precision="bf16", zero_stage=0)
    if variant.startswith("bf16"):
        return replace(base, precision="bf16", zero_stage=1)
    return base


@contextlib.contextmanager
def variant_settings(variant: str, step: C.Step):
    """What a variant changes on a built step, undone afterwards."""
    import torch

    engine = step.holder
    saved = (engine.enable_backward_allreduce, torch.backends.cuda.matmul.allow_tf32, step.batch)
    if variant == "bf16_ar":
        engine.enable_backward_allreduce = True  # DeepSpeed's default on one rank (before build_engine skipped it)
    if variant == "fp32_tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    if variant == "bf16_pinned" and step.spec.gpu:
        step.batch = step.batch.pin_memory()
    try:
        yield
    finally:
        engine.enable_backward_allreduce, torch.backends.cuda.matmul.allow_tf32, step.batch = saved


def marked_step(step: C.Step) -> float:
    """bench/common.py `build_step`'s run, with its phases marked for the profiler."""
    from torch.profiler import record_function

    engine = step.holder
    with record_function("phase:to_device"):
        batch = step.batch.to(engine.device, float_dtype=step.float_dtype)
    with record_function("phase:forward"):
        loss, _ = engine(batch)
    with record_function("phase:backward"):
        engine.backward(loss)
    with record_function("phase:step"):
        engine.step()
    return float(loss.detach())


def _inside(event, start: float, end: float) -> bool:
    return start <= event.time_range.start and event.time_range.end <= end


def _covered(events, start: float, end: float) -> float:
    """Length of the union of the events' intervals clipped to [start, end] (microseconds)."""
    spans = sorted((max(start, e.time_range.start), min(end, e.time_range.end)) for e in events
                   if e.time_range.end > start and e.time_range.start < end)
    total, cur_a, cur_b = 0.0, None, None
    for a, b in spans:
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    return total + (cur_b - cur_a if cur_b is not None else 0.0)


def summarize(prof, steps: int, gpu: bool) -> dict:
    """Per-step counts and times from a profile of `steps` marked steps (see the module docstring)."""
    from torch.autograd import DeviceType

    events = list(prof.events())
    host = [e for e in events if e.device_type == DeviceType.CPU]
    step_ranges = sorted((e.time_range.start, e.time_range.end) for e in host if e.name == "profiled_step")
    phases = [e for e in host if e.name.startswith("phase:")]
    # Ranges opened on the host (record_function: ours, the optimizers', DeepSpeed's) are mirrored
    # on the GPU timeline as annotations spanning their kernels: not work of the GPU.
    ranges = {e.name for e in host if getattr(e, "is_user_annotation", False) or not e.name.startswith(("aten::", "cu"))}
    device = [e for e in events if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)
              and e.name not in ranges]
    out: dict = {"steps": len(step_ranges)}
    n = max(1, len(step_ranges))
    out["step_ms"] = sum(b - a for a, b in step_ranges) / n / 1e3

    def phase_of(e) -> str | None:
        for p in phases:
            if _inside(e, p.time_range.start, p.time_range.end):
                return p.name.split(":", 1)[1]
        return None

    launches, syncs, sync_ops = Counter(), Counter(), Counter()
    aten_top = []
    for e in host:
        if e.name.startswith(LAUNCH_PREFIXES):
            launches[phase_of(e) or "other"] += 1
        elif e.name in SYNC_CALLS:
            syncs[phase_of(e) or "other"] += 1
        elif e.name.startswith("aten::"):
            parent = e.cpu_parent
            if parent is None or not parent.name.startswith("aten::"):
                aten_top.append(e)
            if e.name in SYNC_OPS:
                sync_ops[f"{e.name[6:]}@{phase_of(e) or 'other'}"] += 1
    out["launches"] = sum(launches.values()) / n
    out["sync_calls"] = sum(syncs.values()) / n
    out["aten_ops"] = len(aten_top) / n
    out["sync_ops"] = {k: v / n for k, v in sorted(sync_ops.items())}
    host_ms: dict[str, float] = defaultdict(float)
    in_aten: dict[str, float] = defaultdict(float)  # host time inside aten ops (any thread): the rest is Python
    for p in phases:
        name = p.name.split(":", 1)[1]
        host_ms[name] += (p.time_range.end - p.time_range.start) / n / 1e3
        in_aten[name] += _covered(aten_top, p.time_range.start, p.time_range.end) / n / 1e3
    out["phase_host_ms"] = {k: host_ms.get(k, 0.0) for k in PHASES}
    out["phase_aten_ms"] = {k: in_aten.get(k, 0.0) for k in PHASES}
    out["phase_launches"] = {k: launches.get(k, 0) / n for k in PHASES}
    out["phase_syncs"] = {k: syncs.get(k, 0) / n for k in PHASES}
    if gpu:
        # The union of kernel / memcpy / memset intervals inside each step's window: what the GPU
        # did; the rest of the window it waited for the host.
        busy = sum(_covered(device, a, b) for a, b in step_ranges)
        out["gpu_busy_ms"] = busy / n / 1e3
        out["phase_gpu_ms"] = {k: sum(_covered(device, p.time_range.start, p.time_range.end) for p in phases
                                      if p.name == f"phase:{k}") / n / 1e3 for k in PHASES}
        out["gpu_idle_frac"] = 1.0 - out["gpu_busy_ms"] / out["step_ms"] if out["step_ms"] else None
        out["kernels"] = sum(1 for e in device if "memcpy" not in e.name.lower()
                             and "memset" not in e.name.lower()) / n
    return out


def top_ops(prof, steps: int, key: str, limit: int) -> list[tuple[str, float, float]]:
    """(name, calls per step, self ms per step) of the `limit` ops with the most self time
    (`key`: "device" or "cpu")."""
    rows = []
    for avg in prof.key_averages():
        if getattr(avg, "is_user_annotation", False) or avg.key.startswith(("phase:", "profiled_step")):
            continue
        if key == "device":
            t = getattr(avg, "self_device_time_total", None)
            t = getattr(avg, "self_cuda_time_total", 0.0) if t is None else t
        else:
            t = avg.self_cpu_time_total
        if t > 0:
            rows.append((avg.key, avg.count / steps, t / steps / 1e3))
    rows.sort(key=lambda r: -r[2])
    return rows[:limit]


def profile_one(config: str, variant: str, batch: int, *, gpu: bool, steps: int, timed: int, warmup: int,
                base_optimizer: str = "torch_fused", trace_dir: Path | None = None) -> tuple[dict, str]:
    """(summary row, text report) of one variant at one batch."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    base = C.StepSpec(config=config, shape=C.PRETRAIN, batch=batch, gpu=gpu, optimizer=base_optimizer)
    t0 = time.perf_counter()
    with C.quiet_output():
        step = C.build_step(spec_for(variant, base))
    build_s = time.perf_counter() - t0
    engine = step.holder
    opt = type(engine.optimizer).__name__
    try:
        with variant_settings(variant, step):
            for _ in range(warmup):
                marked_step(step)
            C.sync(gpu)
            times = []
            for _ in range(timed):
                C.sync(gpu)
                t = time.perf_counter()
                marked_step(step)
                C.sync(gpu)
                times.append(time.perf_counter() - t)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    with record_function("profiled_step"):
                        marked_step(step)
                        C.sync(gpu)
            if trace_dir is not None:
                import gzip
                import shutil

                raw = trace_dir / f"trace_{variant}_b{batch}.json"
                prof.export_chrome_trace(str(raw))
                with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                raw.unlink()
        s = summarize(prof, steps, gpu)
        times.sort()
        row = {"variant": variant, "batch": batch, "optimizer": opt,
               "ms_median": times[len(times) // 2] * 1e3, "ms_best": times[0] * 1e3, "build_s": build_s, **s}
        row["samples_per_s"] = batch / (row["ms_median"] / 1e3)
        flops = C.flops_per_sample(C.model_config(config, C.PRETRAIN), C.PRETRAIN)
        row["tflops"] = row["samples_per_s"] * flops / 1e12
        if gpu:
            from vilbert_ds.metrics import peak_tflops

            peak = peak_tflops("bf16")
            row["mfu_vs_bf16_peak"] = row["tflops"] / peak if peak else None
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        text = report(row, top_ops(prof, steps, "device", 15) if gpu else [], top_ops(prof, steps, "cpu", 15))
        return row, text
    finally:
        C.free(step)
        if gpu:
            torch.cuda.reset_peak_memory_stats()


def report(row: dict, by_device: list, by_host: list) -> str:
    lines = [f"=== {row['variant']} batch {row['batch']} ({row['optimizer']}): {row['ms_median']:.1f} ms/step median, "
             f"{row['ms_best']:.1f} best, {row['samples_per_s']:,.0f} samples/s, {row['tflops']:.1f} TFLOP/s"
             + (f", MFU {row['mfu_vs_bf16_peak']:.3f}" if row.get("mfu_vs_bf16_peak") else "")]
    lines.append(f"profiled: {row['step_ms']:.1f} ms/step; launches {row['launches']:.0f}; sync calls "
                 f"{row['sync_calls']:.0f}; aten ops {row['aten_ops']:.0f}; sync ops "
                 + (", ".join(f"{k} {v:g}" for k, v in row["sync_ops"].items()) or "none")
                 + (f"; GPU busy {row['gpu_busy_ms']:.1f} ms, idle {row['gpu_idle_frac']:.0%}"
                    if "gpu_busy_ms" in row else ""))
    gpu = "phase_gpu_ms" in row
    lines.append("phase       host ms  in aten ops  launches  sync calls" + ("  GPU busy ms in phase" if gpu else ""))
    for p in PHASES:
        lines.append(f"{p:<10} {row['phase_host_ms'][p]:8.1f} {row['phase_aten_ms'][p]:12.1f} "
                     f"{row['phase_launches'][p]:9.0f} {row['phase_syncs'][p]:11.0f}"
                     + (f" {row['phase_gpu_ms'][p]:21.1f}" if gpu else ""))
    for title, rows in (("top ops by self device time", by_device), ("top ops by self host time", by_host)):
        if not rows:
            continue
        lines.append(f"{title} (calls/step, ms/step):")
        lines += [f"  {ms:8.2f} {calls:7.0f}  {name[:90]}" for name, calls, ms in rows]
    return "\n".join(lines)


SUMMARY_COLUMNS = ("variant", "batch", "ms_median", "samples_per_s", "tflops", "mfu_vs_bf16_peak", "launches",
                   "sync_calls", "aten_ops", "gpu_busy_ms", "gpu_idle_frac", "peak_gib")


def summary_table(rows: list[dict]) -> str:
    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1 else f"{v:,.1f}"
        return str(v)

    cols = [c for c in SUMMARY_COLUMNS if any(c in r for r in rows)]
    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    out = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    out += ["  ".join(v.rjust(w) for v, w in zip(x, widths)) for x in cells]
    return "\n".join(out)


# Most telling first: a --budget that runs out drops the tail.
DEFAULT_RUNS = ("bf16_zero0@64", "bf16_ar@64", "bf16@64", "bf16_zero0@512", "bf16@512", "bf16_pinned@512",
                "fp32@512", "fp32_tf32@512", "bf16_ar@512", "fp32@64", "fp32_tf32@64", "bf16_pinned@64")


def parse_run(text: str) -> tuple[str, int]:
    variant, _, batch = text.partition("@")
    if variant not in VARIANTS or not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected VARIANT@BATCH, VARIANT one of {', '.join(VARIANTS)}")
    return variant, int(batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="profile on the CUDA device (CPU + CUDA activities)")
    parser.add_argument("--config", default="base_6layer_6conect", choices=C.MODEL_CONFIGS)
    parser.add_argument("--runs", nargs="+", type=parse_run, default=[parse_run(r) for r in DEFAULT_RUNS],
                        metavar="VARIANT@BATCH", help="in this order (default: %s)" % " ".join(DEFAULT_RUNS))
    parser.add_argument("--steps", type=int, default=2, help="profiled steps per run")
    parser.add_argument("--timed", type=int, default=8, help="unprofiled timed steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--base-optimizer", choices=("fused_adam", "torch_fused"), default="torch_fused",
                        help="the optimizer under DeepSpeed's wrappers (torch_fused needs no op build)")
    parser.add_argument("--trace", nargs="*", type=parse_run, default=[], metavar="VARIANT@BATCH",
                        help="also write a gzipped Chrome trace of these runs")
    parser.add_argument("--budget", type=float, default=None, help="seconds: start no run after this")
    parser.add_argument("--out", required=True, help="directory for profile.txt and profile.json")
    args = parser.parse_args(argv)
    C.setup_env(gpu=args.gpu)
    import torch

    if args.gpu and not torch.cuda.is_available():
        print("bench/profile_step.py --gpu: no CUDA device here", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = C.machine()
    header = f"machine: {C.machine_line(info)}\ncommand: {C.command_line()}\n"
    (out / "profile.txt").write_text(header, encoding="utf-8")
    start = time.perf_counter()
    rows: list[dict] = []
    for variant, batch in args.runs:
        if args.budget is not None and time.perf_counter() - start > args.budget:
            print(f"[profile] budget spent: {variant}@{batch} not run", file=sys.stderr, flush=True)
            continue
        t0 = time.perf_counter()
        try:
            row, text = profile_one(args.config, variant, batch, gpu=args.gpu, steps=args.steps, timed=args.timed,
                                    warmup=args.warmup, base_optimizer=args.base_optimizer,
                                    trace_dir=out if (variant, batch) in args.trace else None)
        except Exception as e:  # noqa: BLE001 - one failed run must not cost the others
            text = f"=== {variant} batch {batch}: FAILED {type(e).__name__}: {e}"
            row = {"variant": variant, "batch": batch, "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        with open(out / "profile.txt", "a", encoding="utf-8") as f:
            f.write("\n" + text + "\n")
        # Rewritten after every run: a call cut short by its timeout still leaves the runs done.
        (out / "profile.json").write_text(json.dumps({"machine": info, "command": C.command_line(), "rows": rows},
                                                     indent=1, default=str) + "\n", encoding="utf-8")
        print(text, flush=True)
        print(f"[profile] {variant}@{batch}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    table = summary_table([r for r in rows if "error" not in r])
    with open(out / "profile.txt", "a", encoding="utf-8") as f:
        f.write("\n=== summary (per step)\n" + table + "\n")
    print("\n=== summary (per step)\n" + table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
