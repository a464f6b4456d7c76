"""The CPU allocator setting (vilbert_ds/hostmem.py): step time against committed memory.

    python bench/host_alloc.py --quick        # 2layer_2conect step + the 2 GB-bucket pattern
    python bench/host_alloc.py                # + 6layer_6conect (the step docs/PERFORMANCE.md cites)

Each mode runs in its own process (malloc settings are process-wide and must precede the first
allocation) that builds the training step of bench/common.py (DeepSpeed engine as
`vilbert_ds.pretrain` builds it, 1 rank, ZeRO-0, pretraining shapes); the three processes then
step in interleaved rounds, so that other load on a shared machine hits every mode alike:
  glibc      glibc's defaults (`VILBERT_DS_KEEP_FREED_MEMORY=0`)
  unbounded  never mmap, never trim: the first hostmem setting (commit 0517e5d)
  bounded    blocks up to 32 MiB kept in the heap, 512 MiB of free top kept (the shipped setting)
Per mode: the best step wall time and process CPU time over the rounds (CPU time counts the work
on a machine shared with other jobs, where wall time also counts the wait for a core), minor
page faults and system CPU seconds per step (getrusage), and after the steps the committed memory (private writable mappings), the
largest single mapping (what the kernel checks at fork under the default overcommit heuristic)
and the resident size; then the seconds a fork() of the process takes.

The `buckets` scenario repeats, in-process and without a model, what a ZeRO-1/2 step with
DeepSpeed's default bucket size (5e8 elements) does each step: a 2 GB fp32 buffer allocated and
partly written while small blocks come and go, then freed. Under `unbounded` its heap grew by
~1.9 GB per step until fork() failed (issue 12 item 5).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

MODES = ("glibc", "unbounded", "bounded")
MiB = 2**20


def apply_mode(mode: str) -> None:
    """Before anything large is allocated. build_engine calls keep_freed_memory() again later:
    the first call's setting stays."""
    from vilbert_ds.hostmem import keep_freed_memory

    if mode == "glibc":
        os.environ["VILBERT_DS_KEEP_FREED_MEMORY"] = "0"
    elif mode == "unbounded":
        assert keep_freed_memory(max_block=None, max_kept=None)
    else:
        assert keep_freed_memory()


def fork_seconds() -> float | None:
    """Seconds for fork() + the child's exit (page tables copied); None if fork fails."""
    t0 = time.perf_counter()
    try:
        pid = os.fork()
    except OSError:
        return None
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return time.perf_counter() - t0


def memory_row() -> dict:
    from vilbert_ds.hostmem import committed

    c = committed()
    return dict(committed_mib=c.total / MiB, largest_mib=c.largest / MiB, rss_mib=c.resident / MiB)


def serve_steps(mode: str, config: str, batch: int, warmup: int) -> None:
    """Child side of `measure_steps`: build the step, warm up, then run one step per "step" line
    on stdin (answering wall s, CPU s, minor faults, system s) until "end" (answering the memory
    row and the fork time)."""
    C.setup_env()
    apply_mode(mode)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    step = C.build_step(C.StepSpec(config=config, shape=C.PRETRAIN, batch=batch))
    for _ in range(warmup):
        step.step()
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0, c0 = time.perf_counter(), time.process_time()
        step.step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        print("STEP " + json.dumps([wall, cpu, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime]), flush=True)
    print("RESULT " + json.dumps(dict(**memory_row(), fork_s=fork_seconds())), flush=True)


def run_buckets(mode: str, steps: int) -> dict:
    """A ZeRO bucket-sized block per step amid small allocations (no model)."""
    apply_mode(mode)
    import torch

    keep = []
    walls = []
    for i in range(steps):
        t0 = time.perf_counter()
        bucket = torch.empty(500_000_000, dtype=torch.float32)  # DeepSpeed's default reduce/allgather bucket
        bucket[:5_000_000].fill_(1.0)  # a small model fills only the start of it
        keep.append([torch.ones(20_000 + 1000 * (i % 7)) for _ in range(40)])  # blocks that outlive the step
        del bucket
        keep = keep[-3:]
        walls.append(time.perf_counter() - t0)
    return dict(step_s=min(walls), **memory_row(), fork_s=fork_seconds())


def child(args) -> int:
    if args.scenario == "buckets":
        print("RESULT " + json.dumps(run_buckets(args.mode, args.steps)), flush=True)
    else:
        serve_steps(args.mode, args.config, args.batch, args.warmup)
    return 0


def _child_cmd(scenario: str, mode: str, **kw) -> list[str]:
    cmd = [sys.executable, __file__, "--child", "--scenario", scenario, "--mode", mode]
    for key, value in kw.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def _child_env() -> dict[str, str]:
    # one thread by default: OpenMP threads spin while they wait, so on a shared, oversubscribed
    # machine a 2-thread step also counts the spinning as CPU time
    env = C.child_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("VILBERT_DS_KEEP_FREED_MEMORY", None)
    return env


def _line(proc, prefix: str) -> str:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line[len(prefix):]
    raise SystemExit(f"a measuring process ended early ({proc.wait()}):\n{proc.stderr.read()[-3000:]}")


def measure_steps(config: str, batch: int, rounds: int) -> dict[str, dict]:
    """One process per mode, all built first; then steps in interleaved rounds (A B C A B C ...)
    so that load from other jobs on a shared machine hits every mode alike. Per mode: the best
    step wall and CPU time, mean faults and system time per step, memory after the steps."""
    procs = {m: subprocess.Popen(_child_cmd("step", m, config=config, batch=batch, warmup=3), env=_child_env(),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for m in MODES}
    try:
        for proc in procs.values():
            _line(proc, "READY")
        steps: dict[str, list] = {m: [] for m in MODES}
        for _ in range(rounds):
            for m, proc in procs.items():
                proc.stdin.write("step\n")
                proc.stdin.flush()
                steps[m].append(json.loads(_line(proc, "STEP ")))
        out = {}
        for m, proc in procs.items():
            proc.stdin.write("end\n")
            proc.stdin.flush()
            rows = steps[m]
            out[m] = dict(step_s=min(r[0] for r in rows), cpu_s=min(r[1] for r in rows),
                          faults_per_step=sum(r[2] for r in rows) / len(rows),
                          sys_s_per_step=sum(r[3] for r in rows) / len(rows), **json.loads(_line(proc, "RESULT ")))
        return out
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def measure_buckets(mode: str, steps: int) -> dict:
    proc = subprocess.run(_child_cmd("buckets", mode, steps=steps), capture_output=True, text=True, env=_child_env(),
                          timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"buckets/{mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2layer_2conect only")
    p.add_argument("--configs", nargs="*", choices=C.MODEL_CONFIGS)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode, in interleaved rounds")
    p.add_argument("--bucket-steps", type=int, default=12)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scenario", default="step", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--config", default="", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    configs = args.configs or (("base_2layer_2conect",) if args.quick else ("base_2layer_2conect", "base_6layer_6conect"))
    steps = C.Table("Training step per allocator mode (1 rank, ZeRO-0, pretraining shapes, fp32)",
                    ["config", "batch", "mode", "step s", "CPU s/step", "vs glibc (CPU)", "faults/step", "sys s/step",
                     "committed MiB",
                     "largest MiB", "RSS MiB", "fork s"])
    for config in configs:
        rows = measure_steps(config, args.batch, args.steps)
        for m in MODES:
            r = rows[m]
            steps.add(**{"config": C.SHORT_NAMES[config], "batch": args.batch, "mode": m, "step s": r["step_s"],
                         "CPU s/step": r["cpu_s"], "vs glibc (CPU)": C.ratio(rows["glibc"]["cpu_s"], r["cpu_s"]),
                         "faults/step": r["faults_per_step"],
                         "sys s/step": r["sys_s_per_step"], "committed MiB": r["committed_mib"],
                         "largest MiB": r["largest_mib"], "RSS MiB": r["rss_mib"], "fork s": r["fork_s"]})
    steps.notes.append("step s, CPU s/step: best of the timed steps after 3 warm-up steps; vs glibc (CPU): glibc's "
                       "CPU s/step / this mode's (>1 = less work); fork s: '-' = fork() failed")
    buckets = C.Table(f"A 2 GB ZeRO bucket per step, {args.bucket_steps} steps",
                      ["mode", "committed MiB", "largest MiB", "RSS MiB", "fork s"])
    for m in MODES:
        r = measure_buckets(m, args.bucket_steps)
        buckets.add(**{"mode": m, "committed MiB": r["committed_mib"], "largest MiB": r["largest_mib"],
                       "RSS MiB": r["rss_mib"], "fork s": r["fork_s"]})
    C.report([steps, buckets], C.machine(), args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
