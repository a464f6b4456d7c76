"""Pretraining with real DeepSpeed ranks on CPU (gloo) through the `deepspeed` launcher, on the
synthetic shards of tests/fixtures/data.py read by the real streaming loader.

Launches are shared between tests (module fixtures) to stay within the time budget:
  A  2 ranks ZeRO-1, stops at step 4 of 8      -> export; resumed on 1 rank (universal) to 8
  B  2 ranks ZeRO-3, stops at step 4 of 8      -> export equals A's; ZeRO-3 -> 1 resume refused
  F  2 ranks ZeRO-2, SIGUSR1 to rank 1 only    } the sample keys per (rank, update) equal the
  G  resume F with --resume auto               } loader's uninterrupted order; F exits 75
  H  1 rank ZeRO-2, 24 steps, uninterrupted    } parameters bitwise equal (J vs H)
  I  1 rank, SIGKILL after its first checkpoint}
  J  resume I with --resume auto               }
Every launch runs under a hard timeout that kills its process group.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from fixtures.training import (model_state, rank_pids, real_data_section, run_training, start_training, wait_for,
                               write_ds_config, write_train_config)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAUNCH_TIMEOUT = 240  # seconds per launch (CI machines are loaded; a healthy launch takes ~30 s)
PRETRAIN = ["-m", "vilbert_ds.pretrain"]
TINY = {"config": "tiny", "overrides": {}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, synthetic_shards, minilm_dir):
    root = tmp_path_factory.mktemp("train_dist")
    data = real_data_section(synthetic_shards.manifest, minilm_dir)

    def config(name: str, *, total: int, **train) -> Path:
        return write_train_config(root / f"{name}.yaml", root / name, data=data, model=TINY,
                                  train={"total_steps": total, **train})

    return root, config


def _args(cfg: Path, ds: Path, *extra: str) -> list[str]:
    return ["--config", str(cfg), "--deepspeed", str(ds), *extra]


def _meta(run: Path) -> dict:
    ckpt = run / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    return json.loads((ckpt / tag / "vilbert_ds.json").read_text())


def _metrics(run: Path) -> list[dict]:
    from vilbert_ds.metrics import read_metrics

    return [r for r in read_metrics(run) if "train/loss" in r]


# ============================================================== A, B: ZeRO-1 and ZeRO-3
@pytest.fixture(scope="module")
def stage_runs(workdir):
    root, config = workdir
    runs = {}
    for stage in (1, 3):
        name = f"zero{stage}"
        # train_batch_size fixed, accumulation derived: 2 ranks x 2 x 1, or 1 rank x 2 x 2
        ds = write_ds_config(root / f"{name}.json", stage=stage, micro=2, accumulation=None, train_batch_size=4)
        cfg = config(name, total=8, stop_at_step=4, save_every=4)
        out = run_training(2, _args(cfg, ds), entry=PRETRAIN, timeout=LAUNCH_TIMEOUT, log_path=root / f"{name}.log")
        runs[stage] = (cfg, ds, root / name, out.stdout)
    return runs


@pytest.mark.parametrize("stage", [1, 3])
def test_two_rank_zero_runs_train_and_checkpoint(stage_runs, stage):
    cfg, ds, run, log = stage_runs[stage]
    meta = _meta(run)
    assert meta["step"] == 4 and meta["world_size"] == 2 and meta["zero_stage"] == stage
    assert meta["samples_seen"] == 16 and meta["batch_sizes"] == {"micro": 2, "accumulation": 1, "global": 4}
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("train/masked_lm_loss", "train/masked_img_loss", "train/alignment_loss", "train/alignment_acc",
                "opt/lr", "opt/grad_norm", "perf/samples_per_s", "perf/tokens_per_s_per_rank", "perf/tflops",
                "perf/data_wait_frac", "mem/peak_gib_per_rank", "run/restart_count"):
        assert key in rows[-1], key
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows)
    assert rows[-1]["perf/samples_per_s"] == pytest.approx(2 * rows[-1]["perf/samples_per_s_per_rank"])
    from vilbert_ds.metrics import read_metrics

    assert any(r.get("ckpt/save_s", 0) > 0 for r in read_metrics(run))


def test_fp32_export_loads_into_a_plain_model_with_the_same_outputs(stage_runs, tmp_path, python, repo_root):
    import subprocess

    from vilbert_ds import load_model
    from vilbert_ds.checkpoint import export_fp32
    from vilbert_ds.model import ViLBert, ViLBertConfig

    exported = {}
    out1 = tmp_path / "export1"  # through the command line once, in-process for the other
    done = subprocess.run([python, "-m", "vilbert_ds.cli", "export", str(stage_runs[1][2]), "--out", str(out1)],
                          timeout=120, cwd=repo_root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    exported[1] = load_model(out1).eval()
    exported[3] = load_model(export_fp32(stage_runs[3][2], tmp_path / "export3")).eval()
    # the export is the checkpoint's fp32 weights, exactly
    state = {k[len("model."):]: v for k, v in model_state(stage_runs[3][2]).items()}
    reference = ViLBert(ViLBertConfig.from_dict(_meta(stage_runs[3][2])["model_config"])).eval()
    reference.load_state_dict(state, strict=False)
    g = torch.Generator().manual_seed(0)
    B, L, R = 2, 12, 11
    inputs = dict(input_ids=torch.randint(1, 30000, (B, L), generator=g), image_feat=torch.rand(B, R, 2048, generator=g),
                  image_loc=torch.rand(B, R, 5, generator=g), attention_mask=torch.ones(B, L, dtype=torch.long),
                  image_attention_mask=torch.ones(B, R, dtype=torch.long))
    with torch.no_grad():
        out3 = exported[3](**inputs, heads=("seq_relationship", "text_prediction", "vision_prediction"))
        ref = reference(**inputs, heads=("seq_relationship", "text_prediction", "vision_prediction"))
        out1 = exported[1](**inputs, heads=("seq_relationship", "text_prediction", "vision_prediction"))
    for name in ("seq_relationship", "text_prediction", "vision_prediction", "pooled_output"):
        assert torch.equal(getattr(out3, name), getattr(ref, name)), name
        # ZeRO-1 and ZeRO-3 trained the same model on the same batches: same weights up to reduction order
        assert torch.allclose(getattr(out1, name), getattr(out3, name), atol=1e-4, rtol=1e-4), name
    trained = [k for k, v in exported[3].state_dict().items() if not torch.equal(v, ViLBert(exported[3].config).state_dict()[k])]
    assert trained, "the export holds the initial weights, not the trained ones"


def test_resume_on_one_rank_from_two_through_a_universal_checkpoint(stage_runs, tmp_path):
    cfg, ds, run, _ = stage_runs[1]
    before = model_state(run)
    out = run_training(1, _args(cfg, ds, "--resume", "auto", "train.stop_at_step=null"), entry=PRETRAIN,
                       timeout=LAUNCH_TIMEOUT, log_path=tmp_path / "resume1.log")
    assert "universal" in out.stdout
    assert (run / "checkpoints" / "step00000004_universal").is_dir()
    meta = _meta(run)
    assert meta["step"] == 8 and meta["world_size"] == 1 and meta["samples_seen"] == 32
    assert meta["batch_sizes"] == {"micro": 2, "accumulation": 2, "global": 4}  # derived by DeepSpeed, not by us
    after = model_state(run)
    torch.manual_seed(42)
    from vilbert_ds.model_factory import get_model

    init = {f"model.{k}": v for k, v in get_model(config="tiny", overrides={"with_task_heads": False}).state_dict().items()}
    trained = [k for k in before if k in init and not k.endswith("decoder.weight")]

    def dist(a, b):
        return sum(float((a[k] - b[k]).detach().double().norm() ** 2) for k in trained) ** 0.5

    # 4 more updates at a decaying lr move the weights less than the first 4 did: the run
    # continued from the 2-rank weights, not from a fresh initialisation
    assert 0 < dist(after, before) < 0.6 * dist(before, init)
    rows = _metrics(run)
    assert [r["step"] for r in rows][-4:] == [5, 6, 7, 8]


def test_changing_zero_stage_between_1_2_and_3_on_resume_is_refused(stage_runs, workdir):
    root, _ = workdir
    cfg, _, run, _ = stage_runs[3]
    ds1 = write_ds_config(root / "refuse_zero1.json", stage=1, micro=2, accumulation=None, train_batch_size=4)
    out = run_training(1, _args(cfg, ds1, "--resume", "auto"), entry=PRETRAIN, timeout=120, check=False)
    assert out.returncode == 2, out.stdout[-3000:]
    assert "ZeRO stage 3" in out.stdout and "zero_optimization.stage" in out.stdout and "refused" in out.stdout
    fresh = run_training(1, _args(cfg, ds1), entry=PRETRAIN, timeout=120, check=False)  # --resume none
    assert fresh.returncode == 2 and "--resume auto" in fresh.stdout


# ============================================================ F, G: preemption, 2 ranks
def _loader_order(cfg_path: Path, *, world: int, micro: int, steps: int) -> dict[int, dict[int, list[str]]]:
    """{rank: {update: sample keys}} of an uninterrupted run, read from the loader itself."""
    from vilbert_ds.config import TrainConfig
    from vilbert_ds.data.cc_batches import build_pretrain_loader

    cfg = TrainConfig.load(cfg_path)
    order = {}
    for rank in range(world):
        loader = build_pretrain_loader(cfg.data, split="train", rank=rank, world_size=world,
                                       micro_batch_size=micro, seed=cfg.train.seed)
        keys, epoch = [], 0
        while len(keys) < steps:
            loader.set_epoch(epoch)
            keys += [list(batch.keys) for batch in loader]
            epoch += 1
        order[rank] = {i + 1: k for i, k in enumerate(keys[:steps])}
    return order


def test_two_rank_preempted_and_resumed_run_sees_the_same_samples(workdir):
    from vilbert_ds.trainer import read_sample_log

    root, config = workdir
    ds = write_ds_config(root / "zero2.json", stage=2, micro=2, accumulation=1)
    cut = config("zero2_cut", total=24, save_every=8, log_samples=True)
    run = root / "zero2_cut"
    proc = start_training(2, _args(cut, ds), entry=PRETRAIN)
    try:
        samples = run / "samples" / "rank00000.jsonl"
        wait_for(lambda: samples.exists() and len(samples.read_text().splitlines()) >= 3, LAUNCH_TIMEOUT, proc)
        pids = rank_pids(proc.pid)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGUSR1)  # one rank only: the ranks must agree through the all-reduce
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    (root / "F.log").write_text(out)
    assert proc.returncode == 75, out[-4000:]
    stopped = _meta(run)["step"]
    assert 3 <= stopped < 24, out[-3000:]
    cut_log = read_sample_log(run)
    assert max(cut_log[0]) == max(cut_log[1]) == stopped  # both ranks stopped after the same update

    run_training(2, _args(cut, ds, "--resume", "auto"), entry=PRETRAIN, timeout=LAUNCH_TIMEOUT, log_path=root / "G.log")
    assert _meta(run)["step"] == 24
    expected, resumed = _loader_order(cut, world=2, micro=2, steps=24), read_sample_log(run)
    assert set(resumed) == {0, 1}
    for rank in (0, 1):
        assert sorted(resumed[rank]) == list(range(1, 25))
        assert resumed[rank] == expected[rank]  # per update, the same sample keys as without the stop
    seen = sorted(k for r in resumed.values() for keys in r.values() for k in keys)
    assert seen == sorted(k for r in expected.values() for keys in r.values() for k in keys)
    assert len(seen) == 24 * 2 * 2
    rows = _metrics(run)
    assert rows[-1]["run/samples_seen"] == 96


# =============================================================== H, I, J: kill, 1 rank
def test_killed_and_resumed_single_rank_run_is_bitwise_identical(workdir):
    root, config = workdir
    ds = write_ds_config(root / "zero2_1rank.json", stage=2, micro=2, accumulation=1)
    full = config("kill_full", total=24, save_every=5, keep_last=2)
    run_training(1, _args(full, ds), entry=PRETRAIN, timeout=LAUNCH_TIMEOUT, log_path=root / "H.log")

    cut = config("kill_cut", total=24, save_every=5, keep_last=2)
    run = root / "kill_cut"
    proc = start_training(1, _args(cut, ds), entry=PRETRAIN)
    try:
        wait_for(lambda: (run / "checkpoints" / "latest").exists(), LAUNCH_TIMEOUT, proc, every=0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # no chance to save anything more
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _meta(run)["step"]
    assert killed_at < 24

    out = run_training(1, _args(cut, ds, "--resume", "auto"), entry=PRETRAIN, timeout=LAUNCH_TIMEOUT,
                       log_path=root / "J.log")
    assert f"at step {killed_at}" in out.stdout
    a, b = model_state(root / "kill_full"), model_state(run)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    # keep_last=2: only the two newest checkpoints remain
    tags = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step"))
    assert tags == ["step00000020", "step00000024"]
