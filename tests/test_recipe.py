"""The 12-in-1 recipe as shipped: the optimizer DeepSpeed builds from ds_configs/zero2_12in1.json
against the original's pytorch_transformers AdamW(correct_bias=False) computed by hand in float64,
the base lr derived from the tasks (and overridable), fine-tuning's lr and stop-and-go, the lr
schedules, `model.freeze`, and the refusal of torch_adam with bias_correction.

The reference step: the original's AdamW (pytorch_transformers 1.x, `correct_bias=False`) updates
m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, p <- p - lr m / (sqrt(v) + eps), and THEN decays the
updated weight, p <- p - lr wd p. DeepSpeed's FusedAdam / DeepSpeedCPUAdam (AdamW mode) decay the
weight before the update: p <- p - lr (m / (sqrt(v) + eps) + wd p). The difference d obeys
d_t = (1 - lr wd) d_(t-1) + lr^2 wd u_t (u = m / (sqrt(v) + eps): ~3.2 at step 1 without bias
correction, of order 1-5 later), so |d_T| <= sum_t lr^2 wd |u_t|: ~3e-10 per step at the recipe's
largest lr (1e-4, wd 0.01), below float32 resolution for any weight above ~0.005 in magnitude, so
the recipe is compared at float32 rounding. A stress group (lr 1e-2, wd 0.1) makes
the difference visible and checks that it is this one and no other.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from vilbert_ds.engine import (DeepSpeedConfigError, LRSchedule, base_optimizer, build_engine, load_ds_config,
                               param_groups, validate_ds_config)
from vilbert_ds.engine import lr_rule

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "ds_configs" / "zero2_12in1.json"
BASE_LR, HEAD_LR = 2e-5, 1e-4  # 12-in-1: the tasks' smallest lr; vil_* heads
STRESS_LR, STRESS_WD = 1e-2, 0.1


# ------------------------------------------------------------------ shipped configs
@pytest.mark.parametrize("world", [1, 2, 8])
def test_the_shipped_12in1_configs_validate_with_the_original_optimizer(world):
    from vilbert_ds.config import TrainConfig

    s = validate_ds_config(load_ds_config(RECIPE), source=str(RECIPE), world_size=world, accelerator="cuda")
    assert s.lr is None  # "auto": derived from the tasks
    assert (s.betas, s.eps, s.weight_decay, s.bias_correction, s.gradient_clipping) == ((0.9, 0.999), 1e-6, 0.01,
                                                                                         False, 0.0)
    assert s.accumulation == 1 and s.zero_stage == 2 and s.precision == "fp32"
    cfg = TrainConfig.load("multitask_12in1", kind="multitask")
    assert (cfg.optim.schedule, cfg.optim.warmup_fraction, cfg.optim.bert_lr_scale, cfg.model.freeze) == (
        "warmup_linear", 0.1, 1.0, -1)
    assert cfg.tasks.head_lr == HEAD_LR and cfg.tasks.sampler.kind == "round_robin"
    assert cfg.tasks.sampler.stop_and_go.enabled and cfg.tasks.sampler.stop_and_go.train_iter_gap == 4
    assert TrainConfig.load("pretrain_cc", ["data.train=/x/manifest.json"]).data.objective == 1  # the original README


def test_torch_adam_with_bias_correction_is_refused_by_name():
    config = load_ds_config(RECIPE, ["optimizer.params.torch_adam=true", "optimizer.params.lr=2e-5"])
    with pytest.raises(DeepSpeedConfigError) as e:
        validate_ds_config(config, source="recipe.json", world_size=1, accelerator="cuda")
    assert "recipe.json" in str(e.value) and "optimizer.params.bias_correction: torch_adam" in str(e.value)
    with pytest.raises(DeepSpeedConfigError, match="bias_correction: 'no' must be true or false"):
        validate_ds_config(load_ds_config(RECIPE, ["optimizer.params.bias_correction='no'"]), source="r.json",
                           world_size=1, accelerator="cuda")


# ------------------------------------------------------------------ the reference step
class Toy(nn.Module):
    """Parameters named as ViLBERT's are: a decayed weight, a bias, a LayerNorm, a vil_* head, and
    the stress group's weight. forward(grads) = sum(p * g): each parameter's gradient is g."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(7, 5)
        self.LayerNorm = nn.LayerNorm(5)
        self.vil_prediction = nn.Linear(5, 3)
        self.stress = nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0.0, 1.0)

    def forward(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum((p * grads[n]).sum() for n, p in self.named_parameters())


def original_rule(name: str) -> tuple[float, float]:
    """(lr, weight decay) of one parameter as train_tasks.py assigns them, by its own string tests."""
    if name.startswith("stress."):
        return STRESS_LR, STRESS_WD
    lr = HEAD_LR if "vil_" in name else BASE_LR
    return lr, 0.0 if any(nd in name for nd in ("bias", "LayerNorm.bias", "LayerNorm.weight")) else 0.01


def adamw_reference(p0: torch.Tensor, grads: list[torch.Tensor], lr: float, wd: float, *, decay_after: bool = True,
                    correct_bias: bool = False, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6) -> torch.Tensor:
    """float64 AdamW steps: decay_after=True is pytorch_transformers' AdamW (decay of the updated
    weight), False DeepSpeed's AdamW mode (decay of the weight before the update)."""
    p, m, v = p0.double(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    for t, g in enumerate(grads, 1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t) if correct_bias else lr
        u = m / (v.sqrt() + eps)
        p = (p - step * u) * (1 - lr * wd) if decay_after else p * (1 - lr * wd) - step * u
    return p


def update_sizes(grads: list[torch.Tensor], b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6) -> list[float]:
    """max |u_t| = |m_t| / (sqrt(v_t) + eps) per step, without bias correction (~3.2 at step 1)."""
    m = v = torch.zeros_like(grads[0], dtype=torch.float64)
    sizes = []
    for g in grads:
        m, v = b1 * m + (1 - b1) * g.double(), b2 * v + (1 - b2) * g.double() ** 2
        sizes.append((m / (v.sqrt() + eps)).abs().max().item())
    return sizes


def _single_process_group() -> None:
    import torch.distributed as dist

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ[key] = value
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


# the paths vilbert-ds takes: ZeRO-1/2 over FusedAdam, FusedAdam alone (ZeRO-0), DeepSpeedCPUAdam
# when the optimizer is offloaded. FusedAdam runs its CUDA kernel on a GPU, its C++ one on the CPU
# accelerator (DS_ACCELERATOR=cuda python -m pytest tests/test_recipe.py -k reference: the GPU).
PATHS = {
    "zero2_fused_adam": ([], "FusedAdam"),
    "zero0_fused_adam": (["zero_optimization={stage: 0}"], "FusedAdam"),
    "zero2_offload_cpu_adam": (["zero_optimization.offload_optimizer={device: cpu}"], "DeepSpeedCPUAdam"),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_deepspeed_steps_equal_the_original_adamw_without_bias_correction_reference(path):
    from deepspeed.accelerator import get_accelerator

    overrides, optimizer_name = PATHS[path]
    settings = validate_ds_config(load_ds_config(RECIPE, overrides), source=str(RECIPE), world_size=1)
    settings = settings.with_lr(BASE_LR)
    _single_process_group()
    device = get_accelerator().device_name()
    torch.manual_seed(0)
    toy = Toy()
    start = {n: p.detach().clone() for n, p in toy.named_parameters()}
    trunk = nn.ModuleDict({"dense": toy.dense, "LayerNorm": toy.LayerNorm, "vil_prediction": toy.vil_prediction})
    groups = param_groups(trunk, lr=settings.lr, weight_decay=settings.weight_decay,
                          lr_scale=lr_rule(settings.lr, HEAD_LR))  # vilbert-ds's groups: (lr, decay)
    groups.append({"params": [toy.stress.weight], "lr": STRESS_LR, "weight_decay": STRESS_WD, "name": "stress"})
    engine = build_engine(toy, settings, groups)
    opt = base_optimizer(engine)
    assert type(opt).__name__ == optimizer_name
    assert all(g["bias_correction"] is False and tuple(g["betas"]) == (0.9, 0.999) and g["eps"] == 1e-6
               for g in opt.param_groups)
    steps = [{n: torch.randn_like(p) for n, p in start.items()} for _ in range(3)]
    for grads in steps:
        loss = engine({n: g.to(device) for n, g in grads.items()})
        engine.backward(loss)
        engine.step()
    final = {n: p.detach().float().cpu() for n, p in toy.named_parameters()}
    for name, p0 in start.items():
        lr, wd = original_rule(name)
        g = [s[name] for s in steps]
        original = adamw_reference(p0, g, lr, wd)
        deepspeed_order = adamw_reference(p0, g, lr, wd, decay_after=False)
        got = final[name].double()
        rounding = 2e-6  # float32 kernels, weights of magnitude <= ~4, three steps
        # bias correction on would move the first steps by ~0.7 lr: far outside the tolerance
        assert (adamw_reference(p0, g, lr, wd, correct_bias=True) - original).abs().max() > 50 * rounding * (lr / 1e-4)
        assert (got - deepspeed_order).abs().max() <= rounding, name
        order = (original - deepspeed_order).abs().max().item()
        assert order <= sum(lr**2 * wd * u for u in update_sizes(g)) * 1.001 + 1e-15, name  # the stated bound
        if name.startswith("stress."):  # the decay-order difference is visible, and it is all there is
            assert order > 20 * rounding and (got - original).abs().max() > 10 * rounding
        else:  # the recipe's lrs: the order is below float32 resolution, so DeepSpeed equals the original
            assert order < 1e-8 and (got - original).abs().max() <= rounding, name


# ------------------------------------------------------------------ base lr, finetune
def _prepare(kind: str, registry: Path, tmp_path: Path, *extra: str, tasks: str = "vqa,snli_ve"):
    from vilbert_ds.distributed import DistEnv
    from vilbert_ds.train import prepare

    args = argparse.Namespace(config="multitask_12in1", deepspeed=str(RECIPE), resume="none",
                              overrides=[f"tasks.registry={registry}", f"tasks.data_root={registry.parent}",
                                         f"train.output_dir={tmp_path / kind}", "tasks.batch_size={vqa: 4, gqa: 4, snli_ve: 4}",
                                         *extra])
    if kind == "multitask":
        args.tasks = tasks
    elif kind == "finetune":
        args.task, args.init_from = tasks, str(tmp_path / "model")
    return prepare(args, kind, DistEnv.from_env({}))


def test_base_lr_is_derived_from_the_tasks_unless_set(synthetic_tasks, tmp_path):
    job = _prepare("multitask", synthetic_tasks, tmp_path)  # vqa 4e-5, snli_ve 2e-5
    assert job.settings.lr == 2e-5 and job.settings.config["optimizer"]["params"]["lr"] == 2e-5
    assert "smallest" in job.lr_note
    job = _prepare("multitask", synthetic_tasks, tmp_path, tasks="vqa,gqa")
    assert job.settings.lr == 4e-5
    job = _prepare("multitask", synthetic_tasks, tmp_path, "ds.optimizer.params.lr=3e-5")
    assert job.settings.lr == 3e-5 and "would use the tasks' smallest lr, 2e-05" in job.lr_note
    from vilbert_ds.config import ConfigError
    from vilbert_ds.distributed import DistEnv
    from vilbert_ds.train import prepare

    args = argparse.Namespace(config="pretrain_cc", deepspeed=str(RECIPE), resume="none",
                              overrides=["data.train=/x/manifest.json"])
    with pytest.raises(ConfigError, match="pretraining run has no tasks: set a number"):
        prepare(args, "pretrain", DistEnv.from_env({}))


def test_finetune_trains_at_the_tasks_lr_with_stop_and_go(synthetic_tasks, tmp_path, tiny_config):
    from vilbert_ds.model import ViLBert
    from vilbert_ds.weights import save_model

    save_model(ViLBert(tiny_config), tmp_path / "model")  # the model fine-tuning starts from
    job = _prepare("finetune", synthetic_tasks, tmp_path, tasks="vqa")
    assert job.settings.lr == 4e-5  # VQA's registry lr, as train_tasks.py --tasks 1 trains it
    sag = job.cfg.tasks.sampler.stop_and_go
    assert sag.enabled and sag.train_iter_gap == 4 and job.cfg.tasks.head_lr == HEAD_LR
    # with the packaged defaults alone (no --config) too
    from vilbert_ds.config import TrainConfig

    assert TrainConfig.load(None, kind="finetune").tasks.sampler.stop_and_go.enabled


# ------------------------------------------------------------------ schedules
def test_the_original_schedules():
    p = torch.nn.Parameter(torch.zeros(1))

    def factors(kind: str, total: int = 20, warmup: int = 4, per_epoch: int = 2) -> list[float]:
        opt = torch.optim.SGD([{"params": [p], "lr": 1.0}])
        sched = LRSchedule(opt, total, warmup, kind=kind, iters_per_epoch=per_epoch, decay_epochs=[5, 7])
        out = []
        for _ in range(total):
            sched.step()
            out.append(round(sched.get_last_lr()[0], 6))
        return out

    assert factors("warmup_linear")[:6] == [0.25, 0.5, 0.75, 1.0, 0.9375, 0.875] and factors("warmup_linear")[-1] == 0
    mannul = factors("mannul")  # 2 iterations per epoch: epochs 5-6 = iterations 11-14 at 0.2, 7+ at 0.04
    assert mannul == [0.25, 0.5, 0.75] + [1.0] * 7 + [0.2] * 4 + [0.04] * 6
    cosine = factors("cosine")
    assert cosine[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]  # CosineAnnealingLR starts after warmup, from 1
    assert cosine[5] == round(0.5 * (1 + math.cos(math.pi / 20)), 6)
    assert cosine[-1] == round(0.5 * (1 + math.cos(math.pi * 15 / 20)), 6)  # not 0: T_max is the whole run
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0}])
    again = LRSchedule(opt, 20, 4, kind="mannul", iters_per_epoch=2)
    again.load_state_dict({"last_step": 11, "total_steps": 20, "warmup_steps": 4, "kind": "mannul"})
    assert again.get_last_lr()[0] == pytest.approx(0.2)


# ------------------------------------------------------------------ freeze
def test_freeze_n_leaves_the_text_embeddings_and_layers_0_to_n_without_gradients_or_optimizer_state(tiny_config):
    from vilbert_ds.model import ViLBert
    from vilbert_ds.model_factory import freeze_text_layers

    torch.manual_seed(0)
    model = ViLBert(tiny_config.replace(with_task_heads=True, task_specific_tokens=True))
    assert model.config.num_hidden_layers >= 2
    frozen = set(freeze_text_layers(model, 0))
    expected = {n for n, _ in model.named_parameters() if n.startswith((
        "bert.embeddings.word_embeddings.", "bert.embeddings.position_embeddings.",
        "bert.embeddings.token_type_embeddings.", "bert.embeddings.LayerNorm.", "bert.encoder.layer.0."))}
    assert frozen == expected and not any("task_embeddings" in n or "v_embeddings" in n for n in frozen)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen | {
        n for n, _ in model.named_parameters() if "q_dense" in n}  # q_dense*: always frozen (unused)
    b, t, r = 2, 6, 5
    out = model(input_ids=torch.randint(1, 100, (b, t)), image_feat=torch.randn(b, r, model.config.v_feature_size),
                image_loc=torch.rand(b, r, 5), task_ids=torch.full((b, 1), 1), heads=("vil_prediction",))
    out.vil_prediction.sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert not grads & frozen and "bert.encoder.layer.1.attention.self.query.weight" in grads
    in_groups = {id(p) for g in param_groups(model, lr=1e-4, weight_decay=0.01) for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert not {names[i] for i in in_groups} & frozen  # no optimizer state for them
    assert freeze_text_layers(ViLBert(tiny_config), -1) == []
