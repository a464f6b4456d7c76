"""Smoke tests of the benchmark suite (bench/) and of the performance changes it motivated.

Kept small (< 20 s together): the bench's figures are not asserted, only that its quickest paths
run, that the vilbert-ds and plain steps it compares compute the same loss, and that the changes
made for speed leave the numbers bitwise unchanged.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench_common():
    sys.path.insert(0, str(BENCH))
    try:
        import common

        common.setup_env()
        yield common
    finally:
        sys.path.remove(str(BENCH))


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_single_rank_zero0_without_the_self_allreduce_is_bitwise_identical(bench_common):
    """engine.build_engine skips DeepSpeed's gradient all-reduce on one ZeRO-0 rank (a copy of
    every gradient into a bucket and back): the trajectory must not change by one bit."""
    C = bench_common
    spec = C.StepSpec(config="tiny", batch=4)
    finals = []
    for allreduce in (True, False):
        with C.quiet_output():
            step = C.build_step(spec, seed=3)
        assert step.holder.enable_backward_allreduce is False  # what build_engine now does
        step.holder.enable_backward_allreduce = allreduce
        torch.manual_seed(11)  # dropout draws
        losses = [step.step() for _ in range(3)]
        finals.append((losses, _params(step.objective)))
        C.free(step)
    (losses_a, params_a), (losses_b, params_b) = finals
    assert losses_a == losses_b
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name


@pytest.mark.parametrize("shape", ["pretrain", "vqa"])
def test_plain_and_vilbert_ds_steps_compute_the_same_loss(bench_common, shape):
    import vs_plain

    C = bench_common
    spec = C.StepSpec(config="tiny", shape=C.SHAPES[shape], batch=4)
    with C.quiet_output():
        ours = C.build_step(spec, seed=5)
        plain = C.build_step(C.StepSpec(config="tiny", shape=C.SHAPES[shape], batch=4, plain=True), seed=5)
    a, b = vs_plain.eval_loss(ours, False), vs_plain.eval_loss(plain, False)
    assert a == pytest.approx(b, rel=1e-5)
    assert plain.step() > 0 and ours.step() > 0
    C.free(ours, plain)


def test_quickest_bench_paths_print_their_tables(bench_common, capsys):
    import model_step
    import scaling

    C = bench_common
    tables = model_step.run(True, False, configs=["tiny"], shapes=["pretrain"], variants=["baseline", "eager"],
                            batch=2, budget_s=1.0)
    tables += scaling.run(step_s={"cpu": 1.0})
    C.print_tables(tables, markdown=True)
    out = capsys.readouterr().out
    assert "| tiny | pretrain L36 R37 | 2 | eager |" in out
    assert "ZeRO-3" in out and "Machine:" in out
    rows = tables[0].rows
    assert rows[0]["variant"] == "baseline" and rows[0]["x base"] == pytest.approx(1.0)
    assert all(r["samples/s"] > 0 and r["peak MiB"] > 0 for r in rows)


def test_keep_freed_memory_stops_page_faulting_large_blocks(python):
    """vilbert_ds.hostmem (applied by engine.build_engine on CPU): a freed 64 MiB block is reused
    by the next allocation instead of being unmapped and faulted in again page by page."""
    import subprocess

    code = (
        "import resource, torch\n"
        "from vilbert_ds.hostmem import keep_freed_memory\n"
        "def faults():\n"
        "    for _ in range(8):  # settle: aligned blocks find their place in the heap\n"
        "        x = torch.ones(2**24); del x\n"
        "    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(4):\n"
        "        x = torch.ones(2**24); del x\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0\n"
        "before = faults()\n"
        "assert keep_freed_memory()\n"
        "print(before, faults())\n"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    before, after = map(int, out.split())
    assert before > 4 * 10000  # 4 x 16384 pages of 4 KiB: glibc unmaps the block every time
    assert after < 1000
