"""The less common engine paths in one short 1-rank launch: bf16 with fp32 master weights,
the optimizer offloaded to the CPU (DeepSpeedCPUAdam) and DeepSpeed activation checkpointing
of every encoder layer, on the in-memory loader; then the fp32 export of that checkpoint."""
from __future__ import annotations

import json
import math

import pytest

from fixtures.training import REPO, run_training, write_train_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_bf16_cpu_offload_and_activation_checkpointing(tmp_path):
    from vilbert_ds import load_model
    from vilbert_ds.checkpoint import export_fp32

    cfg = write_train_config(tmp_path / "c.yaml", tmp_path / "run", train={"total_steps": 4, "save_every": 4})
    out = run_training(1, ["--config", str(cfg), "--deepspeed", str(REPO / "ds_configs" / "zero2_act_ckpt.json"),
                           "ds.train_batch_size=2", "ds.train_micro_batch_size_per_gpu=2", 'ds.bf16={"enabled": true}',
                           'ds.zero_optimization.offload_optimizer={"device": "cpu"}'],
                       timeout=240, log_path=tmp_path / "run.log")
    assert "ZeRO-2 bf16" in out.stdout
    ds = json.loads((tmp_path / "run" / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "activation_checkpointing" in ds
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    model = load_model(export_fp32(tmp_path / "run", tmp_path / "model"))
    assert all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in model.parameters())
