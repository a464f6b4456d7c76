"""Multi-task training, fine-tuning and evaluation end to end on the synthetic tasks (real
DeepSpeed engines on CPU, real ranks on gloo)."""
from __future__ import annotations

import argparse
import json
import os
import signal

import pytest
import torch

from fixtures.tasks import ALL_TASKS, read_rows, write_multitask_config, write_task_ds_config
from fixtures.training import model_state, rank_pids, run_training, start_training, wait_for

MULTITASK = ["-m", "vilbert_ds.multitask"]
FINETUNE = ["-m", "vilbert_ds.finetune"]

SERVER_KEYS = {  # the first entry of each task's prediction file
    "vqa": {"question_id", "answer"}, "genomeqa": {"question_id", "answer"}, "gqa": {"questionId", "prediction"},
    "snli_ve": {"pairID", "gold_label"}, "guesswhat": {"question_id", "answer"}, "nlvr2": {"identifier", "prediction"},
}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_every_task_trains_evaluates_and_finetunes(synthetic_tasks, tmp_path):
    run = tmp_path / "mt"
    cfg = write_multitask_config(tmp_path / "mt.yaml", synthetic_tasks, run, list(ALL_TASKS),
                                 train={"total_steps": 4, "save_every": 2})
    ds = write_task_ds_config(tmp_path / "ds.json", stage=2)
    out = run_training(1, ["--tasks", ",".join(ALL_TASKS), "--config", str(cfg), "--deepspeed", str(ds)],
                       entry=MULTITASK, timeout=300).stdout
    assert "final validation" in out, out[-3000:]
    rows = read_rows(run)
    last = {k: v for r in rows for k, v in r.items()}
    for task in ALL_TASKS:
        assert last[f"train/{task}/updates"] == 4  # round-robin: one update per task per iteration
        assert last[f"sampler/{task}/prob"] == 1.0 and last[f"sampler/{task}/stopped"] in (0.0, 1.0)
        assert torch.isfinite(torch.tensor(last[f"train/{task}/loss"]))
        assert 0.0 <= last[f"final/{task}/score"] <= 1.0
        split, count = {"vqa": ("minval", 8), "gqa": ("minval", 8), "genomeqa": ("val", 8), "snli_ve": ("dev", 16),
                        "guesswhat": ("valid", 16), "nlvr2": ("dev", 16)}[task]
        predictions = json.loads((run / "eval" / f"{task}_{split}_predictions.json").read_text())
        assert len(predictions) == count and set(predictions[0]) == SERVER_KEYS[task], (task, predictions[0])
    assert any(f"val/{t}/score" in r for r in rows for t in ALL_TASKS)  # evaluations during training happened
    # evaluation CLI on a test split (no labels: predictions only), straight from the run checkpoint
    from vilbert_ds.evaluate import run_eval

    result = run_eval(argparse.Namespace(task="vqa", ckpt=str(run), split="test", registry=str(synthetic_tasks),
                                         data_root=None, batch_size=5, workers=0, vocab="", out=str(tmp_path / "ev"),
                                         zero_shot=False))
    assert result["count"] == 0 and result["split_samples"] == 8
    test_preds = json.loads((tmp_path / "ev" / "vqa_test_predictions.json").read_text())
    assert len(test_preds) == 8 and all(p["answer"] in {"red", "blue", "green", "yes", "no"} for p in test_preds)
    # the run's label maps (what its answer heads mean) travel into the exported model directory
    from vilbert_ds.cli import main as cli

    maps = json.loads((run / "label_maps.json").read_text())["tasks"]
    assert maps["genomeqa"]["answers"] == maps["vqa"]["answers"] and maps["gqa"]["head"] == "vil_prediction_gqa"
    assert cli(["export", str(run), "--out", str(tmp_path / "exported")]) == 0
    assert json.loads((tmp_path / "exported" / "label_maps.json").read_text())["tasks"] == maps
    # fine-tune one task from the multi-task run (exported to fp32 first)
    ft = tmp_path / "ft"
    out = run_training(1, ["--task", "snli_ve", "--from", str(run), "--config", str(cfg), "--deepspeed", str(ds),
                           f"train.output_dir={ft}", "train.total_steps=2"], entry=FINETUNE, timeout=300).stdout
    assert (ft / "init_model" / "model.safetensors").exists() and (ft / "eval" / "snli_ve_dev_metrics.json").exists(), out[-3000:]
    ft_rows = read_rows(ft)
    assert {k for r in ft_rows for k in r if k.startswith("train/")} == {"train/snli_ve/loss", "train/snli_ve/score",
                                                                       "train/snli_ve/updates"}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_two_ranks_three_tasks_kill_and_resume_matches_uninterrupted(synthetic_tasks, tmp_path):
    tasks = ["vqa", "nlvr2", "guesswhat"]
    ds = write_task_ds_config(tmp_path / "ds.json", stage=2)
    common = dict(train={"total_steps": 16, "save_every": 1000, "keep_last": 2},
                  tasks={"sampler": {"kind": "temperature", "alpha": 0.5, "tasks_per_step": 2, "seed": 3,
                                     "stop_and_go": {"patience": 0, "cooldown": 0}}, "eval_max_batches": 1,
                         "final_eval": False})

    def config(name):
        return write_multitask_config(tmp_path / f"{name}.yaml", synthetic_tasks, tmp_path / name, tasks, batch=4, **common)

    args = lambda name: ["--tasks", ",".join(tasks), "--config", str(config(name)), "--deepspeed", str(ds)]  # noqa: E731
    run_training(2, args("full"), entry=MULTITASK, timeout=300)
    # the same run, stopped by a signal part-way, then resumed
    proc = start_training(2, args("killed"), entry=MULTITASK)
    try:
        metrics = tmp_path / "killed" / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 4, timeout=240, proc=proc)
        os.kill(rank_pids(proc.pid)[1], signal.SIGTERM)  # one rank: all ranks agree to stop at a step boundary
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 75, out[-4000:]
    stopped_at = int((tmp_path / "killed" / "checkpoints" / "latest").read_text().strip()[4:])
    assert 0 < stopped_at < 16
    run_training(2, args("killed") + ["--resume", "auto"], entry=MULTITASK, timeout=300)

    full = {int(r["step"]): r for r in read_rows(tmp_path / "full") if "train/vqa/updates" in r}
    resumed = {int(r["step"]): r for r in read_rows(tmp_path / "killed") if "train/vqa/updates" in r}
    after = [s for s in full if s > stopped_at]
    assert after and all(s in resumed for s in after)
    for s in after:  # same tasks drawn, same batches, same losses and validation scores after the resume
        for key, value in full[s].items():
            if key.startswith(("train/", "sampler/", "val/")):
                assert resumed[s][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (s, key)
    a, b = model_state(tmp_path / "full"), model_state(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    draws = [r for r in full.values() if any(r.get(f"sampler/{t}/stopped") for t in tasks)]
    assert draws, "stop-and-go never stopped a task: the test does not exercise its checkpointed state"
