"""Fast tests of the training building blocks: DeepSpeed config validation, parameter groups,
the learning-rate schedule, the training config, the analytic FLOP count (checked against
DeepSpeed's flops profiler), metrics sinks, and resume planning (no ranks started here)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vilbert_ds.engine import (DeepSpeedConfigError, WarmupLinearSchedule, load_ds_config, param_groups,
                               text_stream_scale, validate_ds_config)

REPO = Path(__file__).resolve().parents[1]


def _ds(**changes):
    cfg = {
        "train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": 0.01}},
        "zero_optimization": {"stage": 2},
    }
    cfg.update(changes)
    return cfg


# ------------------------------------------------------------------ DeepSpeed configs
@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
@pytest.mark.parametrize("world", [1, 2, 8])
def test_shipped_ds_configs_are_valid_for_common_world_sizes(path, world):
    settings = validate_ds_config(load_ds_config(path), source=str(path), world_size=world, accelerator="cuda")
    if "12in1" in path.name:  # the 12-in-1 optimizer recipe: tests/test_recipe.py
        return
    assert settings.lr > 0 and settings.gradient_clipping > 0  # clipping is explicit in every pretraining config
    assert settings.betas == (0.9, 0.98) and settings.eps == 1e-8 and settings.weight_decay == 0.01


def test_shipped_ds_configs_cover_the_required_variants():
    found = set()
    for path in (REPO / "ds_configs").glob("*.json"):
        s = validate_ds_config(load_ds_config(path), source=str(path), world_size=2, accelerator="cuda")
        found.add(f"zero{s.zero_stage}")
        found.add(s.precision)
        if s.offload_optimizer != "none":
            found.add("offload_optimizer")
        if s.offload_param != "none":
            found.add("offload_param")
        found.add("act_ckpt_on" if s.activation_checkpointing else "act_ckpt_off")
        if s.precision == "bf16" and s.config.get("data_types", {}).get("grad_accum_dtype") == "fp32":
            found.add("bf16_fp32_accumulation")
        if s.precision == "fp16" and s.config["fp16"].get("loss_scale") == 0:
            found.add("fp16_dynamic_loss_scale")
    assert {"zero0", "zero1", "zero2", "zero3", "fp32", "bf16", "fp16", "offload_optimizer", "offload_param",
            "act_ckpt_on", "act_ckpt_off", "bf16_fp32_accumulation", "fp16_dynamic_loss_scale"} <= found


@pytest.mark.parametrize("changes, key", [
    ({"zero_optimisation": {"stage": 2}}, "zero_optimisation"),  # typo DeepSpeed would ignore
    ({"train_batch_size": 10}, "train_batch_size"),  # 10 not a multiple of 4 x 2
    ({"gradient_accumulation_steps": 3}, "train_batch_size"),  # 16 != 4 x 3 x 2
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "zero_optimization.offload_param"),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, "zero_optimization.offload_optimizer"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16.enabled"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
    ({"optimizer": {"type": "SGD", "params": {"lr": 0.1}}}, "optimizer.type"),
    ({"gradient_clipping": -1}, "gradient_clipping"),
])
def test_wrong_ds_config_is_refused_naming_the_key(changes, key):
    with pytest.raises(DeepSpeedConfigError) as e:
        validate_ds_config(_ds(**changes), source="my.json", world_size=2, accelerator="cuda")
    assert "my.json" in str(e.value) and f"{key}:" in str(e.value)


def test_missing_clipping_and_optimizer_keys_are_refused():
    cfg = _ds()
    del cfg["gradient_clipping"]
    del cfg["optimizer"]["params"]["eps"]
    with pytest.raises(DeepSpeedConfigError) as e:
        validate_ds_config(cfg, source="x.json", world_size=1, accelerator="cuda")
    assert "gradient_clipping: required" in str(e.value) and "optimizer.params.eps" in str(e.value)


def test_fp16_refused_on_a_cpu_without_fp16(monkeypatch):
    monkeypatch.setattr("vilbert_ds.engine._cpu_fp16_supported", lambda: False)
    with pytest.raises(DeepSpeedConfigError, match="fp16.enabled"):
        validate_ds_config(_ds(fp16={"enabled": True}), source="x.json", world_size=2, accelerator="cpu")


def test_ds_overrides_parse_json_values(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_ds()))
    cfg = load_ds_config(path, ["zero_optimization.stage=3", "bf16.enabled=true", "train_batch_size=32"])
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["bf16"] == {"enabled": True} and cfg["train_batch_size"] == 32


# ------------------------------------------------------------------------ param groups
def test_param_groups_by_lr_and_decay(tiny_config):
    from vilbert_ds.model import ViLBert

    model = ViLBert(tiny_config.replace(with_task_heads=False))
    groups = param_groups(model, lr=1e-4, weight_decay=0.01, lr_scale=text_stream_scale(0.1))
    assert len(groups) == 4  # (1e-4 | 1e-5) x (decay | no decay), not one group per tensor
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))
    assert not any("q_dense" in names[i] for i in seen)  # frozen, no optimizer state
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            text = n.startswith(("bert.embeddings.word", "bert.embeddings.position", "bert.embeddings.token_type",
                                 "bert.embeddings.LayerNorm", "bert.encoder.layer."))
            assert g["lr"] == pytest.approx(1e-5 if text else 1e-4), n
            no_decay = "bias" in n or "LayerNorm" in n
            assert g["weight_decay"] == (0.0 if no_decay else 0.01), n


def test_warmup_linear_schedule_and_state():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1}])
    sched = WarmupLinearSchedule(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        sched.step()
        lrs.append(sched.get_last_lr())
    assert [round(a, 6) for a, _ in lrs] == [0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]
    assert all(b == pytest.approx(a * 0.1) for a, b in lrs)
    opt2 = torch.optim.SGD([{"params": [p], "lr": 1.0}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1}])
    sched2 = WarmupLinearSchedule(opt2, total_steps=10, warmup_steps=2)
    state = json.loads(json.dumps(sched.state_dict()))  # plain data
    sched2.load_state_dict({**state, "last_step": 3})
    assert sched2.get_last_lr()[0] == pytest.approx(0.875)


# ---------------------------------------------------------------------- training config
def test_train_config_yaml_overrides_and_errors(tmp_path):
    from vilbert_ds.config import ConfigError, TrainConfig, split_overrides

    path = tmp_path / "c.yaml"
    path.write_text("data: {train: /x/manifest.json}\ntrain: {total_steps: 5}\n")
    train, ds = split_overrides(["train.save_every=2", "model.overrides.v_hidden_size=64", "ds.zero_optimization.stage=3"])
    cfg = TrainConfig.load(path, train)
    assert cfg.train.total_steps == 5 and cfg.train.save_every == 2 and cfg.model.overrides == {"v_hidden_size": 64}
    assert cfg.train.tf32 is False and TrainConfig.load(path, ["train.tf32=true"]).train.tf32 is True
    assert ds == ["zero_optimization.stage=3"]
    assert cfg.optim.bert_lr_scale == 1.0 and cfg.optim.warmup_fraction == 0.1 and cfg.train.seed == 42
    with pytest.raises(ConfigError, match=r"train: unknown keys \['totl_steps'\]"):
        TrainConfig.load(path, ["train.totl_steps=3"])
    with pytest.raises(ConfigError, match="optim.bert_lr_scale"):
        TrainConfig.load(path, ["optim.bert_lr_scale=0"])
    with pytest.raises(ConfigError, match="unknown sections"):
        TrainConfig.load(path, ["optimizer.lr=3"])


def test_packaged_presets_load():
    from vilbert_ds.config import TrainConfig, resolve_config_path

    for name in ("pretrain_cc", "demo"):
        cfg = TrainConfig.load(resolve_config_path(name), ["data.train=/x/manifest.json"])
        assert cfg.train.epochs >= 1


# ------------------------------------------------------------------------------- FLOPs
def test_analytic_flops_match_deepspeed_flops_profiler():
    """The analytic count (matmuls only) equals 2 x the MACs DeepSpeed's profiler measures on a
    real forward with every head computed on masked positions only."""
    from deepspeed.profiling.flops_profiler import get_model_profile

    from vilbert_ds.metrics import vilbert_flops
    from vilbert_ds.model import ViLBert
    from vilbert_ds.model.config import tiny

    cfg = tiny(with_task_heads=False, hidden_size=64, intermediate_size=128, v_hidden_size=96,
               v_intermediate_size=96, bi_hidden_size=80, vocab_size=1000, v_target_size=101, v_feature_size=256)
    model = ViLBert(cfg).eval()
    B, L, R = 3, 12, 7
    lm = torch.full((B, L), -1)
    lm[:, 3] = 5  # one masked token per sample
    image_label = torch.full((B, R - 1), -1)
    image_label[:, :2] = 1  # two masked regions per sample
    kwargs = dict(input_ids=torch.randint(1, 1000, (B, L)), image_feat=torch.randn(B, R, 256), image_loc=torch.rand(B, R, 5),
                  token_type_ids=torch.zeros(B, L, dtype=torch.long), attention_mask=torch.ones(B, L, dtype=torch.long),
                  image_attention_mask=torch.ones(B, R, dtype=torch.long), heads=("seq_relationship",),
                  masked_lm_labels=lm, image_label=image_label, image_target=torch.softmax(torch.randn(B, R - 1, 101), -1),
                  next_sentence_label=torch.zeros(B, dtype=torch.long))
    _, macs, _ = get_model_profile(model, kwargs=kwargs, print_profile=False, detailed=False, as_string=False, warm_up=0)
    analytic = vilbert_flops(cfg, text_len=L, regions=R, masked_tokens=1, masked_regions=2).forward * B
    assert analytic == pytest.approx(2 * macs, rel=0.01), (analytic, 2 * macs)


def test_flops_base_model_magnitude():
    from vilbert_ds.metrics import vilbert_flops
    from vilbert_ds.model.config import base_6layer_6conect

    count = vilbert_flops(base_6layer_6conect(), text_len=36, regions=37, masked_tokens=5, masked_regions=5)
    # ~2 x (non-embedding params touched per token) x tokens: tens of GFLOP per sample
    assert 10e9 < count.forward < 40e9 and count.train == 3 * count.forward


# ----------------------------------------------------------------------------- metrics
def test_metrics_sinks_write_jsonl_and_a_widening_csv(tmp_path):
    import csv

    from vilbert_ds.metrics import MetricsConfig, MetricsLogger, read_metrics

    logger = MetricsLogger.for_run(tmp_path, MetricsConfig(wandb="disabled", tensorboard=False, console=False))
    logger.log(1, {"train/loss": 2.0})
    logger.log(2, {"train/loss": 1.5, "ckpt/save_s": 0.3, "perf/mfu": float("nan")})
    logger.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["ckpt/save_s"] == 0.3 and "perf/mfu" not in rows[1]
    with open(tmp_path / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert table[0]["train/loss"] == "2.0" and table[0]["ckpt/save_s"] == "" and table[1]["ckpt/save_s"] == "0.3"


# -------------------------------------------------------------------------- resume plan
def _fake_checkpoint(directory: Path, step: int, *, stage: int, world: int, precision: str = "fp32") -> None:
    """The files a complete checkpoint has (checkpoint.verify_complete), with empty contents."""
    from vilbert_ds.checkpoint import META, atomic_write_text, rank_file, tag_for

    tag = tag_for(step)
    (directory / tag).mkdir(parents=True)
    (directory / tag / META).write_text(json.dumps({"step": step, "zero_stage": stage, "world_size": world,
                                                    "precision": precision, "model_config": {}}))
    torch.save({}, directory / tag / "mp_rank_00_model_states.pt")
    for r in range(world):
        (directory / tag / rank_file(r)).write_text("{}")
        torch.save({}, directory / tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    atomic_write_text(directory / "latest", tag)


def test_resume_plans_and_refusals(tmp_path):
    from vilbert_ds.checkpoint import CheckpointError, plan_resume

    ckpt = tmp_path / "run" / "checkpoints"
    assert plan_resume("auto", ckpt, world_size=2, zero_stage=1, precision="fp32") is None  # fresh start
    _fake_checkpoint(ckpt, 40, stage=1, world=2)
    plan = plan_resume("auto", ckpt, world_size=2, zero_stage=2, precision="fp32")  # 1 <-> 2 is fine
    assert plan.step == 40 and not plan.universal and plan.load_tag == "step00000040"
    plan = plan_resume(str(tmp_path / "run"), ckpt, world_size=1, zero_stage=1, precision="fp32")
    assert plan.universal and plan.load_tag == "step00000040_universal"
    with pytest.raises(CheckpointError, match=r"stage 1.*stage 3.*zero_optimization.stage"):
        plan_resume("auto", ckpt, world_size=2, zero_stage=3, precision="fp32")
    with pytest.raises(CheckpointError, match="bf16"):
        plan_resume("auto", ckpt, world_size=2, zero_stage=1, precision="bf16")
    with pytest.raises(CheckpointError, match="--resume auto"):
        plan_resume("none", ckpt, world_size=2, zero_stage=1, precision="fp32")


def test_rng_capture_restore_roundtrip_is_plain_json():
    import random

    import numpy as np

    from vilbert_ds.checkpoint import capture_rng, restore_rng

    state = json.loads(json.dumps(capture_rng()))
    a = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_trainer_states_written_before_the_one_training_path_are_upgraded():
    """Checkpoints of the former pretraining trainer ("trainer", one loader) and multi-task trainer
    ("multitask") resume: their client_state maps onto the one Trainer's (verified end to end by
    hand: an old run resumed by this code ends bitwise equal to an uninterrupted new run)."""
    from vilbert_ds.trainer import STATE_VERSION, upgrade_state

    loader = {"epoch": 1, "consumed": 3}
    old = {"trainer": {"step": 7, "samples_seen": 56, "epoch": 1, "loader": loader, "schedule": {"last_step": 7},
                       "batch_sizes": {"micro": 4, "accumulation": 1, "global": 8}, "world_size": 2}}
    state, rank = upgrade_state(old, {"rng": "R", "loader": loader})
    assert state["epochs"] == {"train": 1} and state["micro_batches"] == {"train": 4} and state["sampler"] is None
    assert state["updates"] == {"train": 7} and rank == {"rng": "R", "loaders": {"train": loader}}
    mt = {"multitask": {"iteration": 5, "epoch": 0, "updates": {"vqa": 5}, "examples": {"vqa": 40}, "val_scores": {},
                        "task_epochs": {"vqa": 2}, "sampler": {"kind": "round_robin"}, "schedule": {"last_step": 5},
                        "world_size": 1, "tasks": ["vqa"], "micro_batches": {"vqa": 8}}}
    state, rank = upgrade_state(mt, {"rng": "R", "loaders": {"vqa": loader}})
    assert state["step"] == 5 and state["samples_seen"] == 40 and state["epochs"] == {"vqa": 2}
    assert rank["loaders"] == {"vqa": loader}
    current = {"trainer": {"version": STATE_VERSION, "step": 1}}
    assert upgrade_state(current, None) == (current["trainer"], None)
