"""`vilbert-ds demo`, the README's first command, end to end at a reduced size (1 rank, a few
dozen images): shards through the real builder, DeepSpeed pretraining, stop + `--resume auto`,
then synthetic 12-in-1 task shards and a multi-task run from the pretrained checkpoint with its
evaluation, metrics, plots, fp32 export, and the summary it prints; then the printed by-hand
command, and `--out` refusing a directory the demo did not write."""
from __future__ import annotations

import json
import subprocess

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TASKS = ("vqa", "snli_ve", "nlvr2")


@pytest.mark.timeout(900)
def test_demo_runs_both_halves_end_to_end(tmp_path, python, repo_root):
    out = tmp_path / "demo"
    done = subprocess.run(
        [python, "-m", "vilbert_ds.cli", "demo", "--out", str(out), "--images", "96", "--epochs", "2",
         "--ranks", "1", "--task-images", "12", "--task-steps", "6", "--timeout", "300"],
        cwd=repo_root, capture_output=True, text=True, timeout=800,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    for line in ("alignment accuracy", "masked-LM loss", "text-only", "plots", "fp32 model", "by hand"):
        assert line in done.stdout, line
    run, tasks_run = out / "run", out / "tasks" / "run"
    assert "tensorboard" not in done.stdout or (run / "tensorboard").is_dir()  # only sinks that exist are named
    assert (run / "metrics.png").stat().st_size > 10_000 and (tasks_run / "metrics.png").stat().st_size > 10_000
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000012"  # 2 epochs x 96 / 16
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "config.json").exists()
    logged = (out / "train_stdout.log").read_text()
    assert "resumed from" in logged and "step00000006" in logged  # stopped halfway, then resumed
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/masked_lm_loss"] for r in rows if "train/masked_lm_loss" in r]
    assert losses[-1] < losses[0]  # the captions carry signal: masked-LM loss falls even in 12 updates
    from vilbert_ds import load_model

    model = load_model(out / "model")
    assert model.config.hidden_size == 64 and not model.config.with_task_heads  # the demo preset's model
    # the multi-task half: started from the pretrained checkpoint, every task trained, evaluated, printed
    assert (tasks_run / "init_model" / "model.safetensors").exists()
    task_rows = [json.loads(line) for line in (tasks_run / "metrics.jsonl").read_text().splitlines()]
    keys = {k for r in task_rows for k in r}
    for task in TASKS:
        assert {f"train/{task}/loss", f"train/{task}/score", f"sampler/{task}/prob", f"val/{task}/score"} <= keys, task
        assert any(line.split()[:1] == [task] for line in done.stdout.splitlines()), task  # its score row
        split = {"vqa": "minval", "snli_ve": "dev", "nlvr2": "dev"}[task]
        assert 0.0 <= json.loads((tasks_run / "eval" / f"{task}_{split}_metrics.json").read_text())["score"] <= 1.0
    # the printed by-hand pretraining command runs as printed (a fresh output directory)
    by_hand = next(line for line in done.stdout.splitlines() if "by hand" in line).split("by hand", 1)[1].split()
    assert by_hand[:2] == ["vilbert-ds", "pretrain"]
    again = subprocess.run([python, "-m", "vilbert_ds.cli", *by_hand[1:]], cwd=repo_root,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert (out / "again" / "checkpoints" / "latest").read_text().strip() == "step00000012"


def test_demo_refuses_an_out_directory_it_did_not_write(tmp_path, capsys):
    from vilbert_ds.cli import main

    (tmp_path / "mine.txt").write_text("precious")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "did not write" in err and err.strip().count("\n") == 0
    assert (tmp_path / "mine.txt").read_text() == "precious"
