"""Hostile and broken checkpoints: nothing in them runs, every refusal is one line, and a resume
finds the newest complete checkpoint.

One real run is built per module (1 rank, tiny model, ZeRO-2, gloo, through the pretraining entry
point): checkpoints at steps 2 and 4. Each test copies it and breaks the copy.

  * every checkpoint-reading command x every poisoned file (an extra `a_model_states.pt`, the
    optimizer partition, the `mp_rank` model file, each a pickle whose `__reduce__` would create
    a marker file): exit 2, one line naming the file, no marker (commands run in-process through
    `vilbert_ds.cli.main`, the function the `vilbert-ds` script calls);
  * `--resume auto` over a corrupt `latest` / truncated newest checkpoint falls back to step 2
    with one warning per skipped checkpoint (and really resumes, in one launch); refusals when
    nothing is complete, for `--resume PATH` to a broken checkpoint and for a changed model;
  * universal-conversion `.partial` directories and DeepSpeed's /dev/shm segments are not left
    behind; `save_model` is atomic.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from fixtures.tasks import build_synthetic_tasks, write_multitask_config, write_task_ds_config
from fixtures.training import (REPO, launch_cmd, run_training, train_env, wait_for, write_ds_config,
                               write_train_config)

pytestmark = [pytest.mark.distributed]

TAG2, TAG4 = "step00000002", "step00000004"


class Poison:
    """A pickle that creates `marker` when unpickled with weights_only=False."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The clean run (steps 2 and 4) plus the configs every command needs."""
    root = tmp_path_factory.mktemp("hostile")
    ds = write_ds_config(root / "ds.json", stage=2, micro=2)
    cfg = write_train_config(root / "pretrain.yaml", root / "run", train={"total_steps": 4, "save_every": 2})
    run_training(1, ["--config", str(cfg), "--deepspeed", str(ds)], timeout=240, log_path=root / "run.log")
    registry = build_synthetic_tasks(root / "tasks", tasks=("vqa",), images=2, questions=1)
    multitask = write_multitask_config(root / "multitask.yaml", registry, root / "mt", ["vqa"])
    return {"root": root, "run": root / "run", "ds": ds, "pretrain": cfg, "registry": registry,
            "multitask": multitask, "task_ds": write_task_ds_config(root / "task_ds.json")}


def copy_run(world, dest: Path) -> Path:
    shutil.copytree(world["run"], dest)
    return dest


def cli(argv: list[str], capfd) -> tuple[int, list[str]]:
    """Run `vilbert-ds ARGV` in this process; (exit status, non-empty stderr lines)."""
    from vilbert_ds.cli import main

    capfd.readouterr()
    status = main([str(a) for a in argv])
    err = capfd.readouterr().err
    return status, [line for line in err.splitlines() if line.strip()]


# ======================================================================= item 1: no code runs
COMMANDS = {
    "export": lambda w, ckpt, tmp: ["export", ckpt, "--out", tmp / "exported"],
    "eval --ckpt": lambda w, ckpt, tmp: ["eval", "--task", "vqa", "--registry", w["registry"], "--ckpt", ckpt,
                                         "--out", tmp / "eval", "--workers", "0"],
    "finetune --from": lambda w, ckpt, tmp: ["finetune", "--task", "vqa", "--from", ckpt, "--config", w["multitask"],
                                             "--deepspeed", w["task_ds"], f"train.output_dir={tmp / 'ft'}"],
    "multitask model.init_from=": lambda w, ckpt, tmp: ["multitask", "--tasks", "vqa", "--config", w["multitask"],
                                                        "--deepspeed", w["task_ds"], f"model.init_from={ckpt}",
                                                        f"train.output_dir={tmp / 'mt'}"],
    "pretrain --resume PATH": lambda w, ckpt, tmp: ["pretrain", "--config", w["pretrain"], "--deepspeed", w["ds"],
                                                    "--resume", ckpt, f"train.output_dir={tmp / 'fresh'}"],
}
POISONED_FILES = {
    "extra a_model_states.pt": "a_model_states.pt",
    "optimizer partition": "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "mp_rank model file": "mp_rank_00_model_states.pt",
}


@pytest.mark.parametrize("poisoned", list(POISONED_FILES))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_poisoned_checkpoint_is_refused_and_runs_nothing(world, tmp_path, capfd, command, poisoned):
    run = copy_run(world, tmp_path / "downloaded")
    target = run / "checkpoints" / TAG4 / POISONED_FILES[poisoned]
    assert target.exists() or poisoned.startswith("extra")
    marker = tmp_path / "MARKER"
    torch.save({"module": Poison(marker), "optimizer_state_dict": Poison(marker)}, target)

    status, err = cli(COMMANDS[command](world, run, tmp_path), capfd)

    assert status == 2, err
    assert len(err) == 1 and str(target) in err[0] and "weights_only=True" in err[0], err
    assert not marker.exists()
    assert not (tmp_path / "exported").exists() and not (tmp_path / "fresh" / "checkpoints").exists()


def test_the_clean_checkpoint_passes_the_same_check(world, tmp_path, capfd):
    """The control: the real files (LossScaler, ZeroStageEnum, fragment_address inside) load with
    weights_only=True, so export goes through."""
    from vilbert_ds.checkpoint import verify_untrusted

    verify_untrusted(world["run"] / "checkpoints" / TAG4)
    status, err = cli(["export", world["run"], "--out", tmp_path / "exported"], capfd)
    assert status == 0, err
    assert (tmp_path / "exported" / "model.safetensors").exists()


def test_export_under_a_plain_file_is_refused_in_one_line(world, tmp_path, capfd):
    (tmp_path / "file").write_text("")
    status, err = cli(["export", world["run"], "--out", tmp_path / "file" / "model"], capfd)
    assert status == 2 and len(err) == 1 and "is a file, not a directory" in err[0], err


def test_a_latest_file_cannot_point_outside_the_checkpoints(world, tmp_path, capfd):
    run = copy_run(world, tmp_path / "downloaded")
    (run / "checkpoints" / "latest").write_text("../../elsewhere")
    status, err = cli(["export", run, "--out", tmp_path / "exported"], capfd)
    assert status == 2 and len(err) == 1 and "latest" in err[0] and "not a checkpoint tag" in err[0], err


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_convert_refuses_a_poisoned_original_checkpoint(tmp_path, capfd, suffix):
    marker = tmp_path / "MARKER"
    src = tmp_path / f"pretrained_model{suffix}"
    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(2, 2), "x": Poison(marker)}, src)
    status, err = cli(["convert", src, tmp_path / "out", "--config", "tiny"], capfd)
    assert status == 2 and len(err) == 1 and str(src) in err[0], err
    assert not marker.exists() and not (tmp_path / "out").exists()


# ================================================================ item 7: --resume auto falls back
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BREAKAGES = {  # what breaks the newest checkpoint (step 4) -> the file the warning names
    "latest empty": (lambda ck: (ck / "latest").write_text(""), "latest"),
    "latest names nothing": (lambda ck: (ck / "latest").write_text("step00000099"), "latest"),
    "latest garbage": (lambda ck: (ck / "latest").write_bytes(b"\x00\xff../x"), "latest"),
    "meta truncated": (lambda ck: _truncate(ck / TAG4 / "vilbert_ds.json"), "vilbert_ds.json"),
    "meta missing": (lambda ck: (ck / TAG4 / "vilbert_ds.json").unlink(), "vilbert_ds.json"),
    "rank file truncated": (lambda ck: _truncate(ck / TAG4 / "rank00000.json"), "rank00000.json"),
    "model file truncated": (lambda ck: _truncate(ck / TAG4 / "mp_rank_00_model_states.pt"), "mp_rank_00_model_states.pt"),
    "optimizer file missing": (lambda ck: (ck / TAG4 / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink(),
                               "optim_states.pt"),
}


def _plan(ckpt: Path, spec: str = "auto"):
    from vilbert_ds.checkpoint import plan_resume

    return plan_resume(spec, ckpt, world_size=1, zero_stage=2, precision="fp32")


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_resume_auto_skips_a_broken_newest_checkpoint(world, tmp_path, caplog, breakage):
    ckpt = copy_run(world, tmp_path / "run") / "checkpoints"
    breaks, named = BREAKAGES[breakage]
    breaks(ckpt)
    with caplog.at_level("WARNING", logger="vilbert_ds.checkpoint"):
        plan = _plan(ckpt)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and named in warnings[0] and "\n" not in warnings[0], warnings
    if breakage.startswith("latest"):  # the newest checkpoint itself is complete: found by scanning
        assert plan.tag == TAG4
    else:
        assert plan.tag == TAG2 and plan.step == 2
        assert "skipping" in warnings[0] and TAG4 in warnings[0]


def test_resume_auto_refuses_when_no_checkpoint_is_complete(world, tmp_path):
    from vilbert_ds.checkpoint import CheckpointError

    ckpt = copy_run(world, tmp_path / "run") / "checkpoints"
    _truncate(ckpt / TAG4 / "vilbert_ds.json")
    (ckpt / TAG2 / "rank00000.json").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint") as e:
        _plan(ckpt)
    assert "\n" not in str(e.value) and TAG2 in str(e.value) and TAG4 in str(e.value)


def test_resume_auto_without_latest_and_only_a_partial_save_starts_fresh(world, tmp_path, caplog):
    ckpt = copy_run(world, tmp_path / "run") / "checkpoints"
    (ckpt / "latest").unlink()
    shutil.rmtree(ckpt / TAG2)
    (ckpt / TAG4 / "vilbert_ds.json").unlink()  # the first save was cut before its meta
    with caplog.at_level("WARNING", logger="vilbert_ds.checkpoint"):
        assert _plan(ckpt) is None
    assert any("starting fresh" in r.getMessage() for r in caplog.records)


def test_resume_path_to_a_broken_checkpoint_is_refused_in_one_line(world, tmp_path, capfd):
    run = copy_run(world, tmp_path / "other")
    _truncate(run / "checkpoints" / TAG4 / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    status, err = cli(COMMANDS["pretrain --resume PATH"](world, run / "checkpoints" / TAG4, tmp_path), capfd)
    assert status == 2 and len(err) == 1 and "optim_states.pt" in err[0] and "truncated" in err[0], err


def test_resume_with_a_changed_model_config_is_refused_before_any_rank_starts(world, tmp_path, capfd):
    run = copy_run(world, tmp_path / "run")
    status, err = cli(["pretrain", "--config", world["pretrain"], "--deepspeed", world["ds"], "--resume", "auto",
                       f"train.output_dir={run}", "model.overrides.hidden_size=64",
                       "model.overrides.intermediate_size=128"], capfd)
    assert status == 2 and len(err) == 1, err
    assert "vilbert_ds.json" in err[0] and "hidden_size (checkpoint 32, run 64)" in err[0], err
    assert "intermediate_size" in err[0]


def test_resume_auto_really_resumes_from_the_fallback(world, tmp_path):
    """A corrupt `latest` and a truncated newest checkpoint: the launch resumes at step 2 and
    finishes the run (the broken step-4 checkpoint is written anew)."""
    run = copy_run(world, tmp_path / "run")
    ckpt = run / "checkpoints"
    (ckpt / "latest").write_text("")
    _truncate(ckpt / TAG4 / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    out = run_training(1, ["--config", world["pretrain"], "--deepspeed", world["ds"], "--resume", "auto",
                           f"train.output_dir={run}"], timeout=240)
    assert "resumed from" in out.stdout and f"{TAG2}" in out.stdout, out.stdout[-3000:]
    assert out.stdout.count("--resume auto: skipping") == 1, out.stdout[-3000:]
    assert (ckpt / "latest").read_text() == TAG4
    assert json.loads((ckpt / TAG4 / "vilbert_ds.json").read_text())["step"] == 4
    from vilbert_ds.checkpoint import verify_complete

    verify_complete(ckpt / TAG4)


# ================================================================ item 8: nothing left behind
def test_universal_conversion_leaves_no_partial_directory(world, tmp_path):
    from vilbert_ds.engine import convert_to_universal

    ckpt = copy_run(world, tmp_path / "run") / "checkpoints"
    stale = ckpt / f".{TAG4}_universal.partial{2**22 + 12345}"  # a killed conversion (no such pid)
    (stale / "zero").mkdir(parents=True)
    broken = ckpt / "broken"
    shutil.copytree(ckpt / TAG4, broken)
    torch.save({"not": "an optimizer state"}, broken / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(Exception):
        convert_to_universal(ckpt, "broken")
    assert not stale.exists()
    assert not [p for p in ckpt.iterdir() if ".partial" in p.name]
    assert convert_to_universal(ckpt, TAG4) == f"{TAG4}_universal"
    assert (ckpt / f"{TAG4}_universal" / "zero").is_dir()
    assert not [p for p in ckpt.iterdir() if ".partial" in p.name]


def _shm_segments(port: int) -> list[Path]:
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def test_deepspeed_shm_segments_are_gone_even_after_sigkill(world, tmp_path):
    """DeepSpeed's CPU all-reduce op maps one /dev/shm segment per rank and never unlinks it;
    build_engine unlinks them once every rank has mapped them, so a SIGKILLed 2-rank run leaves
    none."""
    cfg = write_train_config(tmp_path / "c.yaml", tmp_path / "run", train={"total_steps": 50, "save_every": 1})
    cmd = launch_cmd(2, [str(REPO / "tests" / "fixtures" / "training.py")],
                     ["--config", str(cfg), "--deepspeed", str(world["ds"])])
    port = int(cmd[cmd.index("--master_port") + 1])
    proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        wait_for(lambda: (tmp_path / "run" / "checkpoints" / "latest").exists(), 240, proc)
        assert not _shm_segments(port)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert not _shm_segments(port)


def test_save_model_is_atomic_and_keeps_foreign_files(tmp_path, tiny_config, monkeypatch):
    from vilbert_ds.model import ViLBert
    from vilbert_ds.weights import CONFIG_NAME, WEIGHTS_NAME, load_model, save_model

    model = ViLBert(tiny_config)
    stale = tmp_path / f".model.partial{2**22 + 54321}"  # a save that was killed
    stale.mkdir()
    out = save_model(model, tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert not stale.exists() and [p.name for p in tmp_path.iterdir()] == ["model"]
    save_model(model, out)  # replaced as a whole
    (out / "README.md").write_text("mine")
    save_model(model, out)  # replaced file by file, the user's file kept
    assert sorted(p.name for p in out.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    load_model(out)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    import vilbert_ds.weights as weights

    monkeypatch.setattr(weights, "save_file", disk_full)  # the weights fail after the config was written
    with pytest.raises(OSError, match="No space"):
        save_model(model, tmp_path / "other")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no half-written directory, no config alone
