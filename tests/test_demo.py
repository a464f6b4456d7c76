"""`vilbert-ds demo`, the README's first command, end to end at a reduced size (1 rank, a few
dozen images): shards through the real builder, DeepSpeed pretraining, stop + `--resume auto`,
metrics, plot, fp32 export, and the summary it prints."""
from __future__ import annotations

import json
import subprocess

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_demo_runs_end_to_end(tmp_path, python, repo_root):
    out = tmp_path / "demo"
    done = subprocess.run(
        [python, "-m", "vilbert_ds.cli", "demo", "--out", str(out), "--images", "96", "--epochs", "2",
         "--ranks", "1", "--timeout", "300"],
        cwd=repo_root, capture_output=True, text=True, timeout=700,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    for line in ("alignment accuracy", "masked-LM loss", "checkpoints", "plot", "fp32 model"):
        assert line in done.stdout, line
    run = out / "run"
    assert (run / "metrics.png").stat().st_size > 10_000
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
