"""Question 4 - data: the full pipeline's samples/s per worker against the raw read of the same
shards (local and S3; `bench/data_bench.py`, the data area's bench), the fraction of step time
a real short training run waits for data, and what the GPU goal asks of the loader.

    python bench/data_wait.py --quick       # data_bench --quick figures + a 1-rank run
    python bench/data_wait.py --no-s3       # without the local S3 endpoint

Goal check: at the assumed H100 rate of the base model (bench/scaling.py: 45% MFU), how many
loader workers per GPU and what read bandwidth keep data waits under 5% of the step, from the
measured per-worker pipeline rate and the shards' bytes per sample (~270 KB).
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import runs  # noqa: E402

WAIT_GOAL = 0.05
GPUS_PER_NODE = 8


def pipeline_table(figures: dict) -> C.Table:
    table = C.Table(f"Q4a data pipeline per worker vs raw read ({figures['samples']} CC-sized samples, "
                    f"{figures['sample_bytes'] / 1e3:.0f} KB each, micro-batch {figures['batch']}; "
                    "bench/data_bench.py)",
                    ["source", "raw read samples/s", "raw read MB/s", "raw tar samples/s", "pipeline samples/s",
                     "pipeline / raw read", "pipeline / raw tar"])
    for source in ("local", "s3"):
        f = figures.get(source)
        if not f:
            continue
        table.add(**{"source": source, "raw read samples/s": f["raw_read"], "raw read MB/s": f["raw_read_MBps"],
                     "raw tar samples/s": f.get("raw_tar"), "pipeline samples/s": f["pipeline"],
                     "pipeline / raw read": f["pipeline_vs_raw_read"],
                     "pipeline / raw tar": f.get("pipeline_vs_raw_tar")})
    table.notes.append("one worker = the loader's per-worker work (read, decode, mask, collate) in one process, "
                       "1 thread; S3 is a local moto server on 127.0.0.1 (no network latency)")
    return table


def wait_table(results: dict[str, runs.RunResult]) -> C.Table:
    table = C.Table("Q4b data wait in real pretraining runs (demo model, 1 loader worker per rank, CPU)",
                    ["ranks", "steps", "samples/s (all ranks)", "step s", "data wait % of step"])
    for key in sorted(results):
        r = results[key]
        if not key.startswith("warm"):
            continue
        table.add(**{"ranks": r.ranks, "steps": r.steps, "samples/s (all ranks)": r.samples_per_s, "step s": r.step_s,
                     "data wait % of step": 100 * r.data_wait_frac})
    table.notes.append("perf/data_wait_frac of the trainer (time blocked on the loader / step time), steps after the "
                       "first; the loader worker shares the 2 cores with the rank(s) here. The < 5% goal is for a "
                       "GPU node at the GPU rate: Q4c")
    return table


def goal_table(figures: dict, gpu_samples_per_s: float, label: str) -> C.Table:
    table = C.Table(f"Q4c what the GPU goal asks of the loader ({label}: {gpu_samples_per_s:,.0f} samples/s per GPU)",
                    ["source", "per worker samples/s", "workers per GPU", "workers per 8-GPU node",
                     "read MB/s per GPU", "read GB/s per node"])
    need = gpu_samples_per_s / (1 - WAIT_GOAL)  # loader throughput that keeps waits under 5% of the step
    for source in ("local", "s3"):
        f = figures.get(source)
        if not f:
            continue
        per_worker = f["pipeline"]
        workers = math.ceil(need / per_worker)
        table.add(**{"source": source, "per worker samples/s": per_worker, "workers per GPU": workers,
                     "workers per 8-GPU node": workers * GPUS_PER_NODE,
                     "read MB/s per GPU": gpu_samples_per_s * figures["sample_bytes"] / 1e6,
                     "read GB/s per node": GPUS_PER_NODE * gpu_samples_per_s * figures["sample_bytes"] / 1e9})
    table.notes += [
        "workers = rate / (1 - 5%) / per-worker pipeline rate measured here (CPU cores of a GPU node are typically "
        "faster per core than this shared VM's)",
        "with prefetching workers, waits stay under 5% when the workers' total rate exceeds the consumption rate",
    ]
    return table


def run(quick: bool = True, *, s3: bool = True, root: Path | None = None, manifest: Path | None = None,
        results: dict[str, runs.RunResult] | None = None, gpu_samples_per_s: float | None = None,
        gpu_label: str | None = None) -> list[C.Table]:
    import data_bench

    start = time.perf_counter()
    figures = data_bench.run(images=256, repeats=2 if quick else 3, s3=s3)  # 8 batches: 2 would time mostly start-up
    print(f"[data] data_bench: {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    results = dict(results or {})
    if not any(k.startswith("warm") for k in results):
        own_root = root is None
        root = root or runs.scratch_dir()
        try:
            manifest = manifest or runs.prepare_shards(root)
            start = time.perf_counter()
            results["warm_1"] = runs.launch_pretrain(root, manifest, ranks=1, steps=6 if quick else 20,
                                                     name="data_wait")
            print(f"[data] training run: {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
        finally:
            if own_root:
                shutil.rmtree(root, ignore_errors=True)
    if gpu_samples_per_s is None:
        import scaling

        gpu_samples_per_s, gpu_label = scaling.h100_assumed_samples_per_s(), "H100 ASSUMED 45% MFU, base model"
    return [pipeline_table(figures), wait_table(results), goal_table(figures, gpu_samples_per_s, gpu_label or "GPU")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--gpu-samples-per-s", type=float, help="a measured GPU rate instead of the H100 assumption")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    C.setup_env()
    info = C.machine()
    tables = run(args.quick, s3=not args.no_s3, gpu_samples_per_s=args.gpu_samples_per_s,
                 gpu_label="GPU measured" if args.gpu_samples_per_s else None)
    C.report(tables, info, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
