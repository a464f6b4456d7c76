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


@pytest.mark.parametrize("precision,stage", [("fp32", 0), ("bf16", 1)])
def test_single_rank_without_the_self_allreduce_is_bitwise_identical(bench_common, precision, stage):
    """engine.build_engine skips DeepSpeed's gradient all-reduce on one rank at ZeRO-0 and under
    bf16 with fp32 accumulation (BF16_Optimizer, ds_configs/zero1_bf16.json), where it is a copy
    of every gradient into a bucket and back: the trajectory must not change by one bit."""
    C = bench_common
    spec = C.StepSpec(config="tiny", batch=4, precision=precision, zero_stage=stage)
    finals = []
    for allreduce in (True, False):
        with C.quiet_output():
            step = C.build_step(spec, seed=3)
        assert step.holder.enable_backward_allreduce is False  # what build_engine now does
        if precision == "bf16":
            assert type(step.holder.optimizer).__name__ == "BF16_Optimizer"
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


def test_torch_fused_optimizer_builds_no_deepspeed_op(bench_common, monkeypatch):
    """Where nvcc cannot build FusedAdam (bench/gpu_session.sh's fallback), DeepSpeed's torch_adam
    with fused=True runs torch.optim.AdamW(fused=True) and build_engine builds no op at all."""
    import vilbert_ds.ops
    from vilbert_ds.engine import base_optimizer

    def refuse(*args, **kwargs):
        raise AssertionError("build_engine built a DeepSpeed op for torch's AdamW")

    monkeypatch.setattr(vilbert_ds.ops, "ensure_ops", refuse)
    C = bench_common
    with C.quiet_output():
        step = C.build_step(C.StepSpec(config="tiny", batch=2, optimizer="torch_fused"))
    opt = base_optimizer(step.holder)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
    assert step.step() > 0
    C.free(step)


def test_results_saved_elsewhere_update_the_doc_block(bench_common, tmp_path, capsys):
    """`run.py --from-json` (results of a lent GPU machine): tables of one title merge, a later
    file adding only rows with a new key; the doc's block between the markers is replaced."""
    import run

    C = bench_common
    cols = ["config", "batch", "variant", "samples/s"]
    first = C.Table("Q1 step", cols, rows=[{"config": "6layer", "batch": 64, "variant": "bf16", "samples/s": 5000.0}])
    second = C.Table("Q1 step", cols, rows=[{"config": "6layer", "batch": 64, "variant": "bf16", "samples/s": 1.0},
                                            {"config": "6layer", "batch": 64, "variant": "compile", "samples/s": 7000.0}],
                     notes=["compile: one call of its own"])
    info = {"cpu": "x", "cores": 16, "torch": "2.11", "deepspeed": "0.19.8", "date": "d", "gpu": "1 x NVIDIA H200"}
    C.save_json(tmp_path / "a.json", [first], info, "python bench/run.py --quick --gpu")
    C.save_json(tmp_path / "b.json", [second], info, "python bench/model_step.py --gpu")
    doc = tmp_path / "PERF.md"
    doc.write_text("head\n<!-- bench:gpu:begin -->\nold\n<!-- bench:gpu:end -->\ntail\n")
    assert run.main(["--gpu", "--from-json", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                     "--update-doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("head\n<!-- bench:gpu:begin -->\nMachine: x (16 cores") and text.endswith("tail\n")
    assert "old" not in text and "GPU 1 x NVIDIA H200" in text
    assert "| 6layer | 64 | bf16 | 5,000 |" in text and "| 6layer | 64 | compile | 7,000 |" in text
    assert "| 6layer | 64 | bf16 | 1.00 |" not in text and "- rows from b.json: compile: one call of its own" in text
    assert "`python bench/run.py --quick --gpu`; `python bench/model_step.py --gpu`" in text
    with pytest.raises(SystemExit, match="not a bench result file"):
        run.main(["--from-json", str(doc)])


def test_training_run_figures_are_read_from_the_run_directory(bench_common, tmp_path):
    """bench/train_runs.py: steady figures are medians over the logged windows after the first."""
    import json

    import train_runs

    run_dir = tmp_path / "pretrain"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("model: {config: base_6layer_6conect}\ndata: {num_workers: 8}\n")
    (run_dir / "ds_config.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 128, "bf16": {"enabled": True},
                                                        "zero_optimization": {"stage": 1}}))
    rows = [{"step": s, "perf/samples_per_s": sps, "perf/tokens_per_s": 10 * sps, "perf/step_s": 128 / sps,
             "perf/tflops": sps * 47.04e-3, "perf/mfu": sps * 47.04e-3 / 989, "perf/data_wait_frac": w,
             "mem/peak_gib_per_rank": 20.0 + s / 100}
            for s, sps, w in ((50, 100.0, 0.9), (100, 6000.0, 0.01), (150, 6400.0, 0.03), (200, 6200.0, 0.02))]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)
                                           + json.dumps({"step": 200, "ckpt/save_s": 4.5}) + "\n")
    row = train_runs.pretrain_row(run_dir)
    assert (row["config"], row["precision"], row["ZeRO"], row["micro-batch"], row["workers"]) == (
        "6layer_6conect", "bf16", 1, 128, 8)
    assert row["samples/s"] == 6200.0 and row["data wait %"] == pytest.approx(2.0)  # the warm-up row left out
    assert row["steps"] == 200 and row["peak GiB"] == pytest.approx(22.0) and row["ckpt save s"] == 4.5
    assert row["MFU"] == pytest.approx(6200 * 47.04e-3 / 989)


def test_keep_freed_memory_stops_page_faulting_large_blocks(python):
    """vilbert_ds.hostmem (applied by engine.build_engine on CPU): eight 16 MiB blocks freed
    together are reused by the next allocations instead of being trimmed from the heap's top and
    faulted in again page by page."""
    import subprocess

    # glibc's defaults, fixed: 16 MiB blocks are mmapped and unmapped on free. (Left dynamic, glibc
    # raises its thresholds after the first free; whether it then trims depends on what else sits
    # at the heap's top, so the baseline was 0 faults in some runs.)
    code = (
        "import ctypes, resource, torch\n"
        "from vilbert_ds.hostmem import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_memory\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "assert libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024) == 1\n"
        "def faults():\n"
        "    for _ in range(4):  # settle\n"
        "        x = [torch.ones(2**22) for _ in range(8)]; del x\n"
        "    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(4):\n"
        "        x = [torch.ones(2**22) for _ in range(8)]; del x\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0\n"
        "before = faults()\n"
        "assert keep_freed_memory()\n"
        "print(before, faults())\n"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    before, after = map(int, out.split())
    assert before > 4 * 10000  # 4 x 8 x 4096 pages of 4 KiB: each block is unmapped and faulted in again
    assert after < 1000
