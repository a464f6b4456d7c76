"""Question 5 - start-up: wall seconds from launch to the end of the first optimizer step, warm
(DeepSpeed ops already built in the per-machine cache) and cold (an empty TORCH_EXTENSIONS_DIR,
so FusedAdam and the CPU ops are compiled first), for 1 and 2 ranks.

    python bench/startup.py --quick      # warm, 1 and 2 ranks
    python bench/startup.py              # + cold, 1 and 2 ranks (compiles DeepSpeed ops: minutes)

Each launch is a real `vilbert_ds.pretrain` run (bench/runs.py: the packaged demo model, CC-sized
synthetic shards, the streaming loader with 1 worker per rank, ZeRO-1 fp32 on CPU). The phases
come from rank 0's log timestamps: imports + rendezvous (until torch.distributed is up), model,
engine and loader (until the pretraining banner), and the first step (incl. the first batch).
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import runs  # noqa: E402

GOAL_S = 60.0  # the goal for a warm start


def _phases(result: runs.RunResult) -> dict[str, float | None]:
    """Seconds per start-up phase from rank 0's log lines (None when a line is missing)."""
    stamps: dict[str, float] = {}
    launched = result.launched_at
    for line in result.log.splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \[rank0\] \w+ ([\w.]+): (.*)", line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if "torch.distributed up" in m.group(3):
            stamps.setdefault("dist", t)
        elif m.group(3).startswith("pretraining:"):
            stamps.setdefault("banner", t)
    dist, banner = stamps.get("dist"), stamps.get("banner")
    first = launched + result.launch_to_first_step_s
    return {
        "imports+rendezvous s": dist - launched if dist else None,
        "model+engine+loader s": banner - dist if banner and dist else None,
        "first step s": first - banner if banner else None,
    }


def run(quick: bool = True, *, root: Path | None = None, manifest: Path | None = None,
        results: dict[str, runs.RunResult] | None = None,
        steps: int = 4) -> tuple[list[C.Table], dict[str, runs.RunResult]]:
    """The question-5 table; returns the runs too (their data-wait figures serve question 4)."""
    own_root = root is None
    root = root or runs.scratch_dir()
    try:
        return _run(quick, root, manifest or runs.prepare_shards(root), dict(results or {}), steps)
    finally:
        if own_root:
            shutil.rmtree(root, ignore_errors=True)


def _run(quick: bool, root: Path, manifest: Path, results: dict[str, runs.RunResult],
         steps: int) -> tuple[list[C.Table], dict[str, runs.RunResult]]:
    cases = [("warm", 1), ("warm", 2)] + ([] if quick else [("cold", 1), ("cold", 2)])
    table = C.Table("Q5 start-up: launch to the end of the first optimizer step (real pretraining launch)",
                    ["start", "ranks", "launch to step 1 s", "imports+rendezvous s", "model+engine+loader s",
                     "first step s", "later step s", "x warm 1 rank", "goal"])
    for kind, ranks in cases:
        key = f"{kind}_{ranks}"
        if key in results:
            continue
        ext = tempfile.mkdtemp(prefix="vilbert-ds-cold-ops-") if kind == "cold" else None
        start = time.perf_counter()
        try:
            results[key] = runs.launch_pretrain(root, manifest, ranks=ranks, steps=steps, extensions_dir=ext,
                                                timeout_s=1800 if kind == "cold" else 600, name=f"startup_{key}")
        finally:
            if ext is not None:
                shutil.rmtree(ext, ignore_errors=True)
        print(f"[startup] {kind} {ranks} rank(s): {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    base = results["warm_1"].launch_to_first_step_s
    for kind, ranks in cases:
        r = results[f"{kind}_{ranks}"]
        row = {"start": kind, "ranks": ranks, "launch to step 1 s": r.launch_to_first_step_s,
               "later step s": r.step_s, "x warm 1 rank": r.launch_to_first_step_s / base,
               "goal": (f"< {GOAL_S:.0f}s: {'met' if r.launch_to_first_step_s < GOAL_S else 'NOT met'}"
                        if kind == "warm" else "-")}
        row.update(_phases(r))
        table.add(**row)
    table.notes += [
        "phases from rank 0's log: launch -> torch.distributed up -> pretraining banner -> step 1 metrics row",
        "cold = empty TORCH_EXTENSIONS_DIR: DeepSpeed compiles its ops once (under a lock; later ranks wait)",
    ]
    return [table], results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="warm starts only")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    C.setup_env()
    info = C.machine()
    tables, _ = run(args.quick, steps=args.steps)
    C.report(tables, info, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
