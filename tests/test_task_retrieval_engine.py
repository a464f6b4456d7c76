"""The four families on the real training and evaluation entry points: one `vilbert_ds.multitask`
run on the DeepSpeed engine (refcoco, visual7w, retrieval_flickr30k, vcr_q_a; ZeRO-1, CPU) with
its final validation and prediction files, then `vilbert-ds eval` on the run's checkpoint:
retrieval ranked in both directions, and zero-shot with the alignment head."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from vilbert_ds.evaluate import add_arguments, run_eval
from vilbert_ds.tasks.build import TaskBuildConfig, build_task
from vilbert_ds.tasks.registry import build_family, load_registry
from vilbert_ds.tasks.synthetic_scenes import SceneSpec, make_scene_tasks

TASKS = ("refcoco", "visual7w", "retrieval_flickr30k", "vcr_q_a")
DS_CONFIG = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
             "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": 0.01}},
             "zero_optimization": {"stage": 1}}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_families_train_on_the_engine_and_evaluate(tmp_path, repo_root):
    registry_path = make_scene_tasks(tmp_path / "data", TASKS, SceneSpec(images=6))
    registry = load_registry(registry_path)
    for task in TASKS:
        build_task(registry, task, TaskBuildConfig(max_count=16))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(DS_CONFIG))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vilbert_ds.multitask", "--tasks", ",".join(TASKS), "--deepspeed", str(ds),
           f"tasks.registry={registry_path}", "model.config=tiny", f"train.output_dir={run}", "train.total_steps=2",
           "tasks.evaluate=false", "metrics.wandb=disabled", "metrics.progress_bar=false", "data.num_workers=0",
           *[f"tasks.batch_size.{t}=4" for t in TASKS], *[f"tasks.eval_batch_size.{t}=8" for t in TASKS]]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "final validation: refcoco" in proc.stdout
    val = {"refcoco": "val", "visual7w": "val", "retrieval_flickr30k": "val", "vcr_q_a": "val"}
    for task, split in val.items():
        result = json.loads((run / "eval" / f"{task}_{split}_metrics.json").read_text())
        assert 0.0 <= result["score"] <= 1.0 and result["count"] > 0, task  # retrieval: ranked (t2i R@1)
        assert json.loads((run / "eval" / f"{task}_{split}_predictions.json").read_text()), task

    def evaluate(*extra: str) -> dict:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return run_eval(parser.parse_args(["--task", "retrieval_flickr30k", "--ckpt", str(run), "--split", "test",
                                           "--registry", str(registry_path), "--workers", "0", "--batch-size", "8",
                                           "--out", str(tmp_path / "eval"), *extra]))

    ranked = evaluate()
    n_test = len({e.payload["image_id"] for e in build_family(registry["retrieval_flickr30k"]).read_annotations("test")})
    assert ranked["images"] == n_test and ranked["captions"] == 5 * n_test
    for key in ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10"):
        assert 0.0 <= ranked[key] <= 100.0, key
    assert ranked["t2i_R@10"] == 100.0  # fewer than 10 test images: every gold image is in the top 10
    zero_shot = evaluate("--zero-shot")
    assert zero_shot["captions"] == ranked["captions"] and 1.0 <= zero_shot["t2i_mean_rank"] <= n_test
    rankings = json.loads((tmp_path / "eval" / "retrieval_flickr30k_test_predictions.json").read_text())
    assert len(rankings["text_to_image"]) == 5 * n_test and len(rankings["image_to_text"]) == n_test
