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

# the throughput, optimiser and memory keys of a pretraining row (tests/test_train_distributed.py)
PRETRAIN_PERF_KEYS = {"opt/lr", "opt/grad_norm", "perf/samples_per_s", "perf/samples_per_s_per_rank", "perf/tokens_per_s",
                      "perf/tokens_per_s_per_rank", "perf/tflops", "perf/tflops_per_rank", "perf/mfu", "perf/step_s",
                      "perf/data_wait_frac", "mem/peak_gib_per_rank", "run/epoch", "run/samples_seen",
                      "run/restart_count"}
SERVER_KEYS = {  # the first entry of each task's prediction file
    "vqa": {"question_id", "answer"}, "genomeqa": {"question_id", "answer"}, "gqa": {"questionId", "prediction"},
    "snli_ve": {"pairID", "gold_label"}, "guesswhat": {"question_id", "answer"}, "nlvr2": {"identifier", "prediction"},
}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_every_task_trains_evaluates_and_finetunes(synthetic_tasks, tmp_path):
    run = tmp_path / "mt"
    cfg = write_multitask_config(tmp_path / "mt.yaml", synthetic_tasks, run, list(ALL_TASKS),
                                 train={"total_steps": 4, "save_every": 2}, metrics={"peak_tflops": 1.0})
    # 2 accumulation steps: each task update runs 2 micro-batches of 4 / (1 rank x 2) examples
    ds = write_task_ds_config(tmp_path / "ds.json", stage=2, gradient_accumulation_steps=2)
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
    logged = [r for r in rows if "train/vqa/updates" in r][-1]
    assert PRETRAIN_PERF_KEYS <= set(logged), PRETRAIN_PERF_KEYS - set(logged)  # as visible as pretraining
    assert logged["run/samples_seen"] == 4 * len(ALL_TASKS) * 4  # iterations x tasks x global batch
    from vilbert_ds.commands.plot import plot_run

    assert plot_run(run).stat().st_size > 10_000  # a panel per metric family, a line per task
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
@pytest.mark.timeout(720)
def test_two_ranks_two_workers_stopped_killed_and_resumed_equals_the_uninterrupted_run(synthetic_tasks, tmp_path):
    """2 ranks x 2 loader workers per task, 3 tasks under a temperature sampler with stop-and-go:
    stopped by a signal to one rank (exit 75), resumed, killed with SIGKILL after a later
    checkpoint taken mid-epoch, resumed again: every logged loss, score and sampler value after
    the first stop and the final weights are bitwise those of the uninterrupted run."""
    tasks = ["vqa", "nlvr2", "guesswhat"]
    ds = write_task_ds_config(tmp_path / "ds.json", stage=2)
    common = dict(train={"total_steps": 16, "save_every": 3, "keep_last": 2}, data={"num_workers": 2},
                  tasks={"sampler": {"kind": "temperature", "alpha": 0.5, "tasks_per_step": 2, "seed": 3,
                                     "stop_and_go": {"patience": 0, "cooldown": 0}}, "eval_max_batches": 1,
                         "final_eval": False})

    def config(name):
        return write_multitask_config(tmp_path / f"{name}.yaml", synthetic_tasks, tmp_path / name, tasks, batch=4, **common)

    args = lambda name: ["--tasks", ",".join(tasks), "--config", str(config(name)), "--deepspeed", str(ds)]  # noqa: E731
    run_training(2, args("full"), entry=MULTITASK, timeout=300)
    run = tmp_path / "cut"
    latest = lambda: int((run / "checkpoints" / "latest").read_text().strip()[4:]) if (run / "checkpoints" / "latest").exists() else 0  # noqa: E731
    proc = start_training(2, args("cut"), entry=MULTITASK)
    try:  # 1. a signal to one rank: all ranks agree to stop at a step boundary, save, exit 75
        metrics = run / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 4, timeout=240, proc=proc)
        os.kill(rank_pids(proc.pid)[1], signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 75, out[-4000:]
    stopped_at = latest()
    assert 0 < stopped_at < 13
    proc = start_training(2, args("cut") + ["--resume", "auto"], entry=MULTITASK)
    try:  # 2. killed without warning once a later checkpoint is complete
        wait_for(lambda: latest() > stopped_at, timeout=240, proc=proc, every=0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    killed_at = latest()
    assert stopped_at < killed_at < 16
    positions = json.loads((run / "checkpoints" / f"step{killed_at:08d}" / "rank00001.json").read_text())["loaders"]
    assert any(0 < p["consumed"] < p["batches_per_epoch"] for p in positions.values()), positions  # mid-epoch
    out = run_training(2, args("cut") + ["--resume", "auto"], entry=MULTITASK, timeout=300).stdout
    assert f"at step {killed_at}" in out

    full = {int(r["step"]): r for r in read_rows(tmp_path / "full") if "train/vqa/updates" in r}
    resumed = {int(r["step"]): r for r in read_rows(run) if "train/vqa/updates" in r}
    # (the row of the step saved just before the SIGKILL may be missing: the kill can land between
    # the checkpoint and the row that reports its save time)
    assert all(s in resumed for s in full if s > killed_at)
    after = [s for s in full if s > stopped_at and s in resumed]
    for s in after:  # same tasks drawn, same batches, same losses and validation scores, bit for bit
        for key, value in full[s].items():
            if key.startswith(("train/", "sampler/", "val/")):
                assert resumed[s][key] == value, (s, key, resumed[s][key], value)
    a, b = model_state(tmp_path / "full"), model_state(run)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    draws = [r for r in full.values() if any(r.get(f"sampler/{t}/stopped") for t in tasks)]
    assert draws, "stop-and-go never stopped a task: the test does not exercise its checkpointed state"
