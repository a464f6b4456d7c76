"""Pretraining with real DeepSpeed ranks on CPU (gloo) through the `deepspeed` launcher, on the
synthetic shards of tests/fixtures/data.py read by the real streaming loader.

Launches are shared between tests (module fixtures) to stay within the time budget:
  A  2 ranks ZeRO-1, stops at step 4 of 8      -> export (again: refused, then --force); resumed
                                                  on 1 rank (universal) to 8: same epoch, same
                                                  share of it consumed (the data position)
  B  2 ranks ZeRO-3, stops at step 4 of 8      -> export equals A's; ZeRO-3 -> 1 resume refused
  F  2 ranks ZeRO-2, SIGUSR1 to rank 1 only    } exit 75 after a complete checkpoint each time;
  G  resume F; SIGTERM to every process of     } the sample keys per (rank, update) equal the
     both ranks (a time limit, a preemption)   } loader's uninterrupted order: nothing skipped
  G2 resume G to the end                       } or repeated across the two stops
  H  1 rank ZeRO-2, 24 steps, uninterrupted    } parameters bitwise equal (J vs H)
  I  1 rank, SIGKILL after its first checkpoint}
  J  resume I with --resume auto               }
Every launch runs under a hard timeout that kills its process group. Signals are sent once the
run logged the step the test waits for, and every assertion holds whatever step they land on.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from fixtures.training import (model_state, rank_pids, real_data_section, run_training, start_training,
                               start_training_until, wait_for, write_ds_config, write_train_config)

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
        cfg = config(name, total=8, stop_at_step=4, save_every=4, log_samples=True)
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


def test_fp32_export_loads_into_a_plain_model_with_the_same_outputs(stage_runs, tmp_path, python, repo_root, capfd):
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
    # a second export into the same directory is refused in one line; --force replaces the model
    # (and a label map the previous model left there: this run has none)
    from vilbert_ds.cli import main as cli

    (out1 / "label_maps.json").write_text("{}")
    before = (out1 / "model.safetensors").stat().st_ino
    capfd.readouterr()
    assert cli(["export", str(stage_runs[1][2]), "--out", str(out1)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists; pass --force" in err[0], err
    assert (out1 / "model.safetensors").stat().st_ino == before
    assert cli(["export", str(stage_runs[1][2]), "--out", str(out1), "--force"]) == 0
    assert (out1 / "model.safetensors").stat().st_ino != before and not (out1 / "label_maps.json").exists()
    assert all(torch.equal(a, b) for a, b in zip(load_model(out1).state_dict().values(),
                                                   exported[1].state_dict().values()))
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
    # the data position: the same epoch, the same share of it consumed. Steps 1-4 took 4 of each
    # rank's 12 batches of 2 (16 of the epoch's 48 samples); on 1 rank (24 batches of 2, 2 per
    # update) the run continues at batch 8 of the 1-rank order of epoch 0: steps 5-8 are its
    # batches 8..15, exactly
    assert {r["run/epoch"] for r in rows} == {0}
    from vilbert_ds.trainer import read_sample_log

    log = read_sample_log(run)
    order = _loader_order(cfg, world=1, micro=2, steps=24)[0]  # per batch
    for step in (5, 6, 7, 8):
        first = 8 + 2 * (step - 5)
        assert log[0][step] == order[first + 1] + order[first + 2], step
    # what the policy promises beyond the position (README "Another number of ranks"): the rest
    # of the epoch is the 1-rank order's batches 8..23, so a sample the 2 ranks consumed may come
    # again in it, once, and as many of the epoch's samples are left out of it
    before = {k for r in (0, 1) for s in (1, 2, 3, 4) for k in log[r][s]}
    rest = [k for b in range(9, 25) for k in order[b]]
    epoch = {k for keys in order.values() for k in keys}
    assert len(before) == 16 and len(set(rest)) == len(rest) == 32 and len(epoch) == 48
    assert before <= epoch and len(before & set(rest)) == len(epoch - before - set(rest))


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


def _last_step(run: Path) -> int:
    """The newest step in rank 0's sample log (0 before the first)."""
    path = run / "samples" / "rank00000.jsonl"
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip().endswith("}")] \
        if path.exists() else []
    return max(steps, default=0)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (the ranks and their data-loader workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _stop_with(proc, send) -> str:
    """Send the signal(s), wait for the launch to end; its output."""
    try:
        send()
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return out


def test_two_rank_run_stopped_by_sigusr1_then_sigterm_sees_every_sample_once(workdir):
    """F: SIGUSR1 to rank 1 only (the ranks agree through the all-reduce); G: the resumed run
    gets SIGTERM on every process of both ranks, data-loader workers included (what a time limit
    or a preemption without warning sends); each time all ranks stop after the same update, save
    a complete checkpoint and exit 75. G2 finishes: every update's samples are the
    uninterrupted order's, every sample once per epoch (3 epochs)."""
    from vilbert_ds.checkpoint import verify_complete
    from vilbert_ds.trainer import read_sample_log

    root, config = workdir
    total = 36  # 3 epochs of 12 updates: room for two stops, whichever step each lands on
    ds = write_ds_config(root / "zero2.json", stage=2, micro=2, accumulation=1)
    cut = config("zero2_cut", total=total, save_every=8, log_samples=True)
    run = root / "zero2_cut"

    def stopped(out: str, after: int, what: str) -> int:
        step = _meta(run)["step"]
        assert after <= step < total, f"{what}: stopped at {step}\n{out[-3000:]}"
        verify_complete(run / "checkpoints" / f"step{step:08d}")  # every file of every rank, whole
        log = read_sample_log(run)
        assert max(log[0]) == max(log[1]) == step, what  # both ranks stopped after the same update
        return step

    proc = start_training_until(2, _args(cut, ds), lambda: _last_step(run) >= 3, timeout=LAUNCH_TIMEOUT, entry=PRETRAIN)
    out = _stop_with(proc, lambda: os.kill(rank_pids(proc.pid)[1], signal.SIGUSR1))  # one rank only
    (root / "F.log").write_text(out)
    assert proc.returncode == 75, out[-4000:]
    first = stopped(out, 3, "SIGUSR1")

    proc = start_training_until(2, _args(cut, ds, "--resume", "auto"), lambda: _last_step(run) >= first + 2,
                                timeout=LAUNCH_TIMEOUT, entry=PRETRAIN)

    def terminate_everything():
        pids = rank_pids(proc.pid)
        assert set(pids) == {0, 1}, pids
        for pid in {p for rank in pids.values() for p in (rank, *_descendants(rank))}:
            os.kill(pid, signal.SIGTERM)

    out = _stop_with(proc, terminate_everything)
    (root / "G.log").write_text(out)
    assert proc.returncode == 75, out[-4000:]
    assert f"at step {first}" in out and "SIGTERM" in out, out[-3000:]
    second = stopped(out, first + 2, "SIGTERM")

    out = run_training(2, _args(cut, ds, "--resume", "auto"), entry=PRETRAIN, timeout=LAUNCH_TIMEOUT,
                       log_path=root / "G2.log").stdout
    assert f"at step {second}" in out
    assert _meta(run)["step"] == total
    expected, resumed = _loader_order(cut, world=2, micro=2, steps=total), read_sample_log(run)
    assert set(resumed) == {0, 1}
    for rank in (0, 1):
        assert sorted(resumed[rank]) == list(range(1, total + 1))
        assert resumed[rank] == expected[rank]  # per update, the same sample keys as without the stops
    for epoch in range(3):  # 12 updates x 2 ranks x 2 samples = the 48 samples, each once
        keys = [k for r in (0, 1) for s in range(12 * epoch + 1, 12 * epoch + 13) for k in resumed[r][s]]
        assert len(keys) == len(set(keys)) == 48, epoch
    rows = _metrics(run)
    assert rows[-1]["run/samples_seen"] == total * 4


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
