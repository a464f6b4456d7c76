"""DeepSpeed engine construction: the only module that imports deepspeed for training.

    ds = load_ds_config("ds_configs/zero2.json", overrides=["train_micro_batch_size_per_gpu=8"])
    settings = validate_ds_config(ds, source="ds_configs/zero2.json", world_size=env.world_size)
    settings = settings.with_lr(2e-5)                           # when the JSON says "lr": "auto"
    engine = build_training_engine(objective, settings, lr_scale=lr_rule(...))
    sched = LRSchedule(engine.optimizer, total_steps=1000, warmup_steps=100)   # or kind="mannul" | "cosine"
    batches = read_batch_sizes(engine)                          # micro, accumulation, global

Batch sizes are read back from the engine (`read_batch_sizes`); nothing divides them by the
world size by hand (task batches: `config.task_micro_batch`). The learning-rate schedule is
*not* handed to DeepSpeed: the trainer steps it once per iteration and saves its
`state_dict()` in the checkpoint's client_state. Heads a task does not use get no gradient;
ZeRO treats their gradient as zero.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .config import SCHEDULE_KINDS  # the original's --lr_scheduler names

log = logging.getLogger(__name__)


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed config that vilbert-ds refuses; the message names the file and the key."""


# Top-level keys DeepSpeed 0.16-0.19 reads. Anything else is a typo that DeepSpeed would ignore
# silently (e.g. "zero_optimisation"), so it is refused. Keys starting with "_" are comments.
KNOWN_DS_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "optimizer", "scheduler", "fp16", "bf16", "amp", "torch_autocast", "zero_optimization",
    "gradient_clipping", "activation_checkpointing", "steps_per_print", "wall_clock_breakdown",
    "prescale_gradients", "gradient_predivide_factor", "communication_data_type", "data_types",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "flops_profiler", "checkpoint",
    "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "dump_state", "memory_breakdown",
    "sparse_gradients", "aio", "elasticity", "data_efficiency", "curriculum_learning", "autotuning",
    "compile", "timers", "seed", "disable_allgather", "graph_harvesting", "use_node_local_storage",
    "load_universal_checkpoint", "seq_parallel_communication_data_type", "nebula",
}
ADAM_TYPES = ("adam", "adamw")
LR_AUTO = "auto"  # optimizer.params.lr: the base lr of a task run = its tasks' smallest lr (the original's rule)
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


@dataclass(frozen=True)
class DeepSpeedSettings:
    """A validated DeepSpeed config plus the facts vilbert-ds reads from it."""

    config: dict[str, Any]
    source: str
    zero_stage: int
    precision: str  # fp32 | bf16 | fp16
    offload_optimizer: str  # none | cpu | nvme
    offload_param: str
    activation_checkpointing: bool
    gradient_clipping: float
    lr: float | None  # None: the JSON says "auto" (a task run derives it: objectives.base_lr); see with_lr
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    accumulation: int = 1  # gradient_accumulation_steps, as DeepSpeed will derive it for this world size
    bias_correction: bool = True  # Adam's 1 - beta^t corrections; the 12-in-1 recipe turns them off

    @property
    def float_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def with_lr(self, lr: float) -> "DeepSpeedSettings":
        """These settings with the base lr set (in the config DeepSpeed receives too)."""
        config = copy.deepcopy(self.config)
        config["optimizer"]["params"]["lr"] = float(lr)
        return dataclasses.replace(self, config=config, lr=float(lr))


# ============================================================================ config I/O
def load_ds_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read a DeepSpeed JSON and apply `dotted.key=value` overrides, values parsed as YAML like
    every other override (`zero_optimization.stage=3`, `bf16.enabled=false`, `bf16={enabled: true}`)."""
    from .config import ConfigError, parse_value, set_dotted

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist (see ds_configs/ for the shipped ones)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"{path}: a DeepSpeed config must be a JSON object")
    for item in overrides:
        if "=" not in item:
            raise DeepSpeedConfigError(f"DeepSpeed override ds.{item!r}: expected ds.key=value")
        key, value = item.split("=", 1)
        try:
            set_dotted(config, key, parse_value(value, f"ds.{key}"), f"ds.{item}")
        except ConfigError as e:
            raise DeepSpeedConfigError(str(e)) from None
    return config


# Keys of the optimizer's params DeepSpeed passes on to FusedAdam / DeepSpeedCPUAdam or, with
# torch_adam, to torch.optim.AdamW (or pops itself).
ADAM_PARAMS = {"lr", "betas", "eps", "weight_decay", "torch_adam", "adam_w_mode", "bias_correction", "amsgrad",
               "fp32_optimizer_states", "set_grad_none", "fused", "foreach", "maximize", "capturable", "differentiable"}
ACTIVATION_CHECKPOINTING_KEYS = {"partition_activations", "contiguous_memory_optimization", "cpu_checkpointing",
                                 "number_checkpoints", "synchronize_checkpoint_boundary", "profile"}


def _section_keys() -> dict[str, set[str]]:
    """Known keys of the nested sections vilbert-ds reads, from DeepSpeed's own config models
    (which would refuse an unknown key only after the process group started)."""
    known = {"optimizer": {"type", "params"}, "optimizer.params": ADAM_PARAMS,
             "activation_checkpointing": ACTIVATION_CHECKPOINTING_KEYS}
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        from deepspeed.runtime.zero.offload_config import (DeepSpeedZeroOffloadOptimizerConfig,
                                                           DeepSpeedZeroOffloadParamConfig)
    except ImportError:  # another DeepSpeed layout: DeepSpeed checks these sections itself
        return known
    models = {"zero_optimization": DeepSpeedZeroConfig, "zero_optimization.offload_optimizer":
              DeepSpeedZeroOffloadOptimizerConfig, "zero_optimization.offload_param": DeepSpeedZeroOffloadParamConfig,
              "fp16": DeepSpeedFP16Config, "bf16": DeepSpeedBF16Config}
    for name, model in models.items():
        known[name] = {n for n, f in model.model_fields.items()} | {f.alias for f in model.model_fields.values() if f.alias}
    return known


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_ds_config(
    config: dict[str, Any],
    *,
    source: str,
    world_size: int,
    accelerator: str | None = None,
) -> DeepSpeedSettings:
    """Refuse a wrong or inconsistent DeepSpeed config before any work starts.

    Every message names `source` and the key at fault. Checks: unknown keys (top level and in
    the sections vilbert-ds reads); sections that must be objects; batch arithmetic against
    `world_size`; ZeRO stage and offload combinations; one precision only and one the
    accelerator has; an explicit `gradient_clipping`; an Adam/AdamW optimizer section (its
    lr/betas/eps/weight_decay are the optimiser hyper-parameters; lr may be "auto", returned as
    None; `bias_correction`, if given, a bool and not with `torch_adam`); no `scheduler` section
    (the lr schedule is stepped by vilbert-ds and saved in the checkpoint).
    """
    errors: list[str] = []

    def err(key: str, why: str) -> None:
        errors.append(f"{key}: {why}")

    for key in config:
        if key not in KNOWN_DS_KEYS and not key.startswith("_"):
            err(key, "not a DeepSpeed config key (typo? DeepSpeed would ignore it silently)")

    def section(path: str) -> dict[str, Any]:
        node: Any = config
        for part in path.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
            node = {} if node is None else node
        if not isinstance(node, dict):
            err(path, f"{node!r} must be an object (e.g. {{\"enabled\": true}})")
            return {}
        return node

    for path, keys in _section_keys().items():
        unknown = sorted(k for k in section(path) if k not in keys and not k.startswith("_"))
        for key in unknown:
            close = difflib.get_close_matches(key, keys, n=3)
            err(f"{path}.{key}", f"not a key of {path}" + (f" (did you mean {' / '.join(close)}?)" if close else ""))

    # ---- batch sizes (DeepSpeed derives the missing one; we check what it would refuse later)
    tb = config.get("train_batch_size")
    mb = config.get("train_micro_batch_size_per_gpu")
    gas = config.get("gradient_accumulation_steps")
    for key, value in (("train_batch_size", tb), ("train_micro_batch_size_per_gpu", mb),
                       ("gradient_accumulation_steps", gas)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            err(key, f"{value!r} must be a positive integer")
    ints = all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1) for v in (tb, mb, gas))
    accumulation = gas or 1
    if ints:
        if tb is None and mb is None:
            err("train_micro_batch_size_per_gpu", "set it (or train_batch_size): no batch size is given")
        elif tb is not None and mb is not None and gas is not None and tb != mb * gas * world_size:
            err("train_batch_size", f"{tb} != train_micro_batch_size_per_gpu {mb} x gradient_accumulation_steps "
                f"{gas} x world size {world_size} = {mb * gas * world_size}")
        elif tb is not None and mb is not None and gas is None and tb % (mb * world_size):
            err("train_batch_size", f"{tb} is not a multiple of train_micro_batch_size_per_gpu {mb} x world size "
                f"{world_size}; no whole gradient_accumulation_steps gives it")
        elif tb is not None and gas is not None and mb is None and tb % (gas * world_size):
            err("train_batch_size", f"{tb} is not a multiple of gradient_accumulation_steps {gas} x world size "
                f"{world_size}")
        elif tb is not None and mb is None and gas is None and tb % world_size:
            err("train_batch_size", f"{tb} is not a multiple of the world size {world_size}")
        elif tb is not None and mb is not None and gas is None:
            accumulation = tb // (mb * world_size)

    # ---- precision
    fp16 = bool(section("fp16").get("enabled", False))
    bf16 = bool(section("bf16").get("enabled", False))
    for name in ("fp16", "bf16"):
        if not isinstance(section(name).get("enabled", False), bool):
            err(f"{name}.enabled", f"{section(name)['enabled']!r} must be true or false")
    if section("amp").get("enabled", False):
        err("amp.enabled", "apex AMP is not supported; use bf16 or fp16")
    if fp16 and bf16:
        err("fp16.enabled", "fp16 and bf16 are both enabled; choose one")
    precision = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    accelerator = accelerator or _accelerator_name()
    if fp16 and accelerator == "cpu" and not _cpu_fp16_supported():
        err("fp16.enabled", "this CPU has no fp16 support in DeepSpeed's CPU accelerator; use bf16 or fp32 here")
    if fp16 and section("fp16").get("loss_scale", 0) not in (0, 0.0):
        log.info("%s: fp16.loss_scale is static (%s); 0 selects the dynamic loss scale", source,
                 config["fp16"]["loss_scale"])

    # ---- ZeRO and offload
    zero = section("zero_optimization")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        err("zero_optimization.stage", f"{stage!r}: choose 0, 1, 2 or 3")
        stage = 0
    off_opt = section("zero_optimization.offload_optimizer").get("device", "none")
    off_par = section("zero_optimization.offload_param").get("device", "none")
    if off_opt not in OFFLOAD_DEVICES:
        err("zero_optimization.offload_optimizer.device", f"{off_opt!r}: choose one of {OFFLOAD_DEVICES}")
    if off_par not in OFFLOAD_DEVICES:
        err("zero_optimization.offload_param.device", f"{off_par!r}: choose one of {OFFLOAD_DEVICES}")
    if off_opt != "none" and stage == 0:
        err("zero_optimization.offload_optimizer", "optimizer offload needs ZeRO stage 1, 2 or 3")
    if off_par != "none" and stage != 3:
        err("zero_optimization.offload_param", f"parameter offload needs ZeRO stage 3 (stage is {stage})")
    if off_par != "none" and off_opt == "none":
        err("zero_optimization.offload_optimizer",
            "offloading parameters without the optimizer leaves optimizer state on the device; offload both")

    # ---- clipping: explicit, so nobody trains unclipped by accident (the original did not clip)
    if "gradient_clipping" not in config:
        err("gradient_clipping", "required: set the max global grad norm (1.0), or 0.0 to train unclipped")
        clip = 0.0
    else:
        clip = config["gradient_clipping"]
        if not _number(clip) or clip < 0:
            err("gradient_clipping", f"{clip!r} must be a number >= 0")
            clip = 0.0

    # ---- optimizer: DeepSpeed builds FusedAdam (or CPUAdam under offload) from this section
    opt = config.get("optimizer")
    lr, betas, eps, wd, bias_correction = 0.0, (0.9, 0.999), 1e-8, 0.0, True
    if not isinstance(opt, dict):
        err("optimizer", 'required: {"type": "AdamW", "params": {"lr", "betas", "eps", "weight_decay"}}')
    else:
        otype = str(opt.get("type", "")).lower()
        if otype not in ADAM_TYPES:
            err("optimizer.type", f"{opt.get('type')!r}: vilbert-ds trains with Adam/AdamW (DeepSpeed FusedAdam)")
        params = section("optimizer.params")
        for key in ("lr", "betas", "eps", "weight_decay"):
            if key not in params:
                err(f"optimizer.params.{key}", "required (explicit optimiser hyper-parameters)")
        lr, eps, wd = params.get("lr", lr), params.get("eps", eps), params.get("weight_decay", wd)
        if lr == LR_AUTO:
            lr = None  # a task run derives it from its tasks (train.prepare); pretraining refuses it there
        elif not _number(lr) or lr <= 0:
            err("optimizer.params.lr", f"{lr!r} must be a number > 0 (or \"{LR_AUTO}\": the tasks' smallest lr)")
            lr = 0.0
        bias_correction = params.get("bias_correction", True)
        if not isinstance(bias_correction, bool):
            err("optimizer.params.bias_correction", f"{bias_correction!r} must be true or false")
        if params.get("torch_adam", False) and "bias_correction" in params:
            # DeepSpeed then builds torch.optim.AdamW, which always corrects the bias and takes no
            # such argument: the run would die with a TypeError after the process group started.
            err("optimizer.params.bias_correction", "torch_adam (torch.optim.AdamW) always corrects the bias and "
                "cannot take bias_correction; remove torch_adam (FusedAdam and DeepSpeedCPUAdam honour it)")
        for key, value in (("eps", eps), ("weight_decay", wd)):
            if not _number(value) or value < 0:
                err(f"optimizer.params.{key}", f"{value!r} must be a number >= 0")
        raw_betas = params.get("betas", betas)
        if (not isinstance(raw_betas, (list, tuple)) or len(raw_betas) != 2
                or not all(_number(b) and 0 <= b < 1 for b in raw_betas)):
            err("optimizer.params.betas", f"{raw_betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.98]")
        else:
            betas = tuple(raw_betas)
        if otype == "adam" and params.get("adam_w_mode", True) is False and wd:
            log.info("%s: optimizer Adam with adam_w_mode=false applies L2, not decoupled weight decay", source)
    if "scheduler" in config:
        err("scheduler", "remove it: vilbert-ds steps its warmup-linear schedule itself (training config "
            "optim.warmup_fraction) and saves it in the checkpoint")

    act = "activation_checkpointing" in config
    if errors:
        raise DeepSpeedConfigError(f"DeepSpeed config {source} refused: " + "; ".join(dict.fromkeys(errors)))
    return DeepSpeedSettings(
        config=config, source=source, zero_stage=int(stage), precision=precision, offload_optimizer=off_opt,
        offload_param=off_par, activation_checkpointing=act, gradient_clipping=float(clip),
        lr=None if lr is None else float(lr), betas=(float(betas[0]), float(betas[1])), eps=float(eps),
        weight_decay=float(wd), accumulation=accumulation, bias_correction=bool(bias_correction),
    )


def _accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def _cpu_fp16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


# ========================================================================= param groups
def no_weight_decay(name: str) -> bool:
    """The original's rule: no decay for biases and LayerNorm parameters."""
    return "bias" in name or "LayerNorm" in name or "layer_norm" in name


def is_text_stream(name: str) -> bool:
    """The BERT weights the original meant to train at 0.1x lr (`bert-base-uncased_weight_name.json`:
    the text embeddings and the text layers; not the MLM head, not the task-token table)."""
    return (name.startswith("bert.embeddings.") and "task_embeddings" not in name) or name.startswith(
        "bert.encoder.layer."
    )


def text_stream_scale(scale: float) -> Callable[[str], float]:
    """lr multiplier by parameter name: `scale` for the text stream, 1 elsewhere."""
    return lambda name: scale if is_text_stream(name) else 1.0


def base_lr(task_lrs: Mapping[str, float]) -> float:
    """The original's base lr: the smallest lr of the selected tasks (`train_tasks.py`). Every
    parameter not named vil_* trains at it; the loss scales are lr_t / this."""
    if not task_lrs:
        raise ValueError("no tasks to derive a base lr from")
    return min(float(lr) for lr in task_lrs.values())


def lr_rule(base_lr: float, head_lr: float | None = None, bert_lr_scale: float = 1.0) -> Callable[[str], float]:
    """Per-parameter lr multiplier: vil_* heads at `head_lr` (the original's 1e-4; None = the
    base lr), the BERT text stream at `bert_lr_scale`, everything else at the base lr."""
    text = text_stream_scale(bert_lr_scale)
    head = (head_lr / base_lr) if head_lr else 1.0
    return lambda name: head if "vil_" in name else text(name)


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    lr_scale: Callable[[str], float] = lambda name: 1.0,
) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (lr, decay): a handful of groups, not one per tensor.

    Frozen parameters (`requires_grad=False`: `q_dense*`, `fixed_*_layer` layers) are left out,
    so they get no optimizer state. Each group has `params`, `lr`, `weight_decay` and a `name`
    such as `lr1e-05_decay` (kept by the optimizer for logging).
    """
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():  # named_parameters yields a tied tensor once
        if not p.requires_grad:
            continue
        key = (lr * lr_scale(name), not no_weight_decay(name))
        groups.setdefault(key, []).append(p)
    out = []
    for (group_lr, decay), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1])):
        out.append({
            "params": params,
            "lr": group_lr,
            "weight_decay": weight_decay if decay else 0.0,
            "name": f"lr{group_lr:.3g}_{'decay' if decay else 'no_decay'}",
        })
    return out


# ============================================================================= schedule


class LRSchedule:
    """The lr factor of every iteration, applied to each group's base lr; stepped once per
    iteration by the trainer, before the updates it applies to. Kinds (the original's
    `--lr_scheduler` values; u = iteration number, 1-based; w = `warmup_steps`; T = `total_steps`):

    - `warmup_linear` (the original README's): u / w for u < w, then (T - u) / (T - w), to 0
      (pytorch_transformers' WarmupLinearSchedule).
    - `mannul` (sic; the original's default): warmup to 1 as above (min(u / w, 1), its
      WarmupConstantSchedule), times `decay_factor` for each of `decay_epochs` (0-based) the
      iteration's epoch has reached: 0.2 from epoch 5, 0.04 from epoch 7.
    - `cosine`: warmup as above, then 0.5 (1 + cos(pi (u - 1 - w) / T)) for u > w: the
      original's CosineAnnealingLR(T_max = T), stepped after each iteration once warmup is over,
      so it ends at about 0.024 of the base lr, not at 0.

    The original steps its warmup schedule after the first task's update of each iteration, so
    that task trains one factor behind the others (its first update at lr 0, or at the full lr
    under mannul/cosine, where two torch schedulers overwrite each other's lr); here every task
    of an iteration trains at that iteration's factor (docs/TASKS.md, the 12-in-1 recipe table).
    Works on any object with `param_groups` (DeepSpeed's ZeRO/bf16 wrappers are not torch
    Optimizers).
    """

    def __init__(self, optimizer, total_steps: int, warmup_steps: int, *, kind: str = "warmup_linear",
                 iters_per_epoch: int = 1, decay_epochs: Iterable[int] = (5, 7), decay_factor: float = 0.2):
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps}: must be >= 1")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps={warmup_steps}: must be within [0, total_steps={total_steps}]")
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule {kind!r}: choose one of {SCHEDULE_KINDS}")
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.kind = kind
        self.iters_per_epoch = max(1, int(iters_per_epoch))
        self.decay_epochs = sorted(int(e) for e in decay_epochs)
        self.decay_factor = float(decay_factor)
        self.base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def factor(self, step: int) -> float:
        warm = step / max(1, self.warmup_steps)
        if self.kind == "warmup_linear":
            if step < self.warmup_steps:
                return warm
            return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))
        if self.kind == "mannul":
            epoch = max(0, step - 1) // self.iters_per_epoch  # the epoch iteration `step` belongs to
            return min(warm, 1.0) * self.decay_factor ** sum(e <= epoch for e in self.decay_epochs)
        if step <= self.warmup_steps:  # cosine
            return min(warm, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * (step - 1 - self.warmup_steps) / self.total_steps))

    def _apply(self) -> None:
        f = self.factor(self.last_step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "base_lrs": list(self.base_lrs), "kind": self.kind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        before = (state["total_steps"], state["warmup_steps"], state.get("kind", "warmup_linear"))
        if before != (self.total_steps, self.warmup_steps, self.kind):
            log.warning("schedule changed on resume: (total, warmup, kind) %s -> %s (continuing with the new one)",
                        before, (self.total_steps, self.warmup_steps, self.kind))
        self.last_step = int(state["last_step"])
        self._apply()


WarmupLinearSchedule = LRSchedule  # the former name: warmup_linear is the default kind


def warmup_steps_for(total_steps: int, warmup_fraction: float) -> int:
    return int(math.floor(total_steps * warmup_fraction))


# =============================================================================== engine
@dataclass(frozen=True)
class BatchSizes:
    micro: int  # samples per rank per forward
    accumulation: int  # micro-batches per optimizer update
    global_: int  # samples per optimizer update, all ranks

    def as_dict(self) -> dict[str, int]:
        return {"micro": self.micro, "accumulation": self.accumulation, "global": self.global_}


def read_batch_sizes(engine) -> BatchSizes:
    """What DeepSpeed derived from the config and the world size (the only source of truth)."""
    return BatchSizes(engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(),
                      engine.train_batch_size())


def enable_activation_checkpointing(model: nn.Module, settings: DeepSpeedSettings) -> None:
    """Checkpoint every encoder layer with DeepSpeed's activation checkpointing (configured by the
    `activation_checkpointing` section: partitioning, CPU checkpointing, ...)."""
    import deepspeed

    encoder = model.bert.encoder
    deepspeed.checkpointing.configure(None, deepspeed_config=settings.config)
    encoder.gradient_checkpointing = True
    encoder.checkpoint_fn = deepspeed.checkpointing.checkpoint


def build_engine(
    module: nn.Module,
    settings: DeepSpeedSettings,
    groups: list[dict[str, Any]],
    *,
    load_universal: bool = False,
):
    """`deepspeed.initialize` with the client parameter groups. DeepSpeed builds the optimizer
    from the config's `optimizer` section: FusedAdam (fused multi-tensor kernel on GPU, the
    vectorised C++ kernel on CPU), or DeepSpeedCPUAdam when the optimizer is offloaded. Ops come
    from the per-machine build cache (`vilbert_ds.ops`)."""
    import deepspeed

    from .ops import ensure_ops

    # Only the op this config uses: FusedAdam, or CPUAdam when the optimizer is offloaded; none when
    # `optimizer.params.torch_adam` makes DeepSpeed build torch.optim.AdamW instead (with `fused: true`
    # its fused kernel: a machine without a working nvcc builds nothing).
    if not settings.config["optimizer"]["params"].get("torch_adam", False):
        ensure_ops(("CPUAdamBuilder",) if settings.offload_optimizer != "none" else ("FusedAdamBuilder",))
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        from .hostmem import keep_freed_memory

        keep_freed_memory()  # else a CPU step page-faults its large blocks in again (vilbert_ds/hostmem.py)
    config = copy.deepcopy(settings.config)
    config["optimizer"]["params"].setdefault("torch_adam", False)
    if load_universal:
        config.setdefault("checkpoint", {})["load_universal"] = True
    config.setdefault("steps_per_print", 10**9)  # vilbert-ds logs; DeepSpeed's own prints are noise
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=groups, config=config)
    from .distributed import release_shm_allreduce_buffer

    release_shm_allreduce_buffer()  # DeepSpeed's comm backend (and with it the shm op) is up by now
    if engine.dp_world_size == 1 and (settings.zero_stage == 0 or _is_bf16_optimizer(engine.optimizer)):
        # One data-parallel rank has nothing to average, yet DeepSpeed would flatten every
        # gradient into a bucket, all-reduce it with itself and copy it back: two extra passes
        # over the gradient bytes per step (bench/vs_plain.py: 1.3-1.5x of a 1-rank CPU step).
        # bf16 with fp32 gradient accumulation (ds_configs/zero1_bf16.json: DeepSpeed's
        # BF16_Optimizer) takes the same path at ZeRO-1, over its fp32 gradients (~1 GB for the
        # base model, plus one copy kernel per parameter tensor on a GPU).
        engine.enable_backward_allreduce = False
    return engine


def _is_bf16_optimizer(optimizer) -> bool:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    return isinstance(optimizer, BF16_Optimizer)


def build_training_engine(objective: nn.Module, settings: DeepSpeedSettings, *,
                          lr_scale: Callable[[str], float] = lambda name: 1.0, compile: bool = False,
                          load_universal: bool = False):
    """The engine every training run (and bench/) assembles around "model + loss"
    (`objective.model` is the ViLBert): DeepSpeed activation checkpointing when the config has
    the section, parameter groups by (lr, decay) scaled by `lr_scale(name)`, DeepSpeed's
    optimizer, and `torch.compile` on request."""
    if settings.lr is None:
        raise ValueError(f"{settings.source}: optimizer.params.lr is \"{LR_AUTO}\"; resolve it first (settings.with_lr)")
    if settings.activation_checkpointing:
        enable_activation_checkpointing(objective.model, settings)
    groups = param_groups(objective.model, lr=settings.lr, weight_decay=settings.weight_decay, lr_scale=lr_scale)
    engine = build_engine(objective, settings, groups, load_universal=load_universal)
    if compile:
        engine.compile()
    return engine


def build_optimizer(groups: list[dict[str, Any]], settings: DeepSpeedSettings):
    """The optimizer `deepspeed.initialize` builds from the config's `optimizer` section, built
    without an engine or a process group, for in-process checks of a recipe
    (`tasks.synthetic_scenes` learning checks): DeepSpeedCPUAdam when the optimizer is offloaded,
    else FusedAdam (the CUDA kernel, or the C++ one on the CPU accelerator); torch.optim.AdamW
    under `torch_adam`. Every group gets the config's betas, eps and bias_correction."""
    from .ops import ensure_ops

    params = dict(settings.config["optimizer"]["params"])
    if settings.lr is None:
        raise ValueError(f"{settings.source}: optimizer.params.lr is \"{LR_AUTO}\"; resolve it first (settings.with_lr)")
    adam_w_mode = str(settings.config["optimizer"].get("type", "")).lower() == "adamw" or params.get("adam_w_mode", True)
    common = dict(lr=settings.lr, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay)
    if params.get("torch_adam", False):
        return (torch.optim.AdamW if adam_w_mode else torch.optim.Adam)(groups, **common)
    if settings.offload_optimizer != "none":
        ensure_ops(("CPUAdamBuilder",))
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, **common, bias_correction=settings.bias_correction, adamw_mode=adam_w_mode)
    ensure_ops(("FusedAdamBuilder",))
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(groups, **common, bias_correction=settings.bias_correction, adam_w_mode=adam_w_mode)


def engine_float_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def base_optimizer(engine):
    """The innermost torch optimizer (FusedAdam / DeepSpeedCPUAdam) under DeepSpeed's wrappers."""
    opt = engine.optimizer
    for _ in range(4):
        inner = getattr(opt, "optimizer", None)
        if inner is None or inner is opt:
            break
        opt = inner
    return opt


def replay_cpu_adam_steps(engine) -> int:
    """Make a resumed run's CPU Adam kernels bitwise identical to an uninterrupted run's.

    DeepSpeed's CPU Adam kernels (FusedAdam on the CPU accelerator and DeepSpeedCPUAdam) cache
    beta^t inside the C++ op and update it by one multiplication per step; a process that
    starts at step t computes pow(beta, t) instead, which differs in the last bit and makes
    the resumed trajectory drift by ~1e-7. Replaying steps 1..t on a 1-element scratch tensor
    (lr 0) rebuilds the cache exactly as the uninterrupted run built it. The CUDA kernels
    compute the bias correction per call and need nothing. Returns the steps replayed.
    """
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    opt = base_optimizer(engine)
    steps = max((int(s.get("step", 0)) for s in opt.state.values() if isinstance(s, dict)), default=0)
    if steps <= 0:
        return 0
    is_cpu_fused = isinstance(opt, FusedAdam) and get_accelerator().device_name() == "cpu"
    if not (is_cpu_fused or isinstance(opt, DeepSpeedCPUAdam)):
        return 0
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    bias_correction = 1 if group.get("bias_correction", True) else 0
    p, g, m, v = (torch.zeros(1) for _ in range(4))
    for step in range(1, steps + 1):
        if isinstance(opt, DeepSpeedCPUAdam):
            opt.ds_opt_adam.adam_update(opt.opt_id, step, 0.0, beta1, beta2, group["eps"], 0.0, bias_correction,
                                        p, g, m, v)
        else:
            opt.multi_tensor_adam(2048 * 32, opt._dummy_overflow_buf, [[g], [p], [m], [v]], 0.0, beta1, beta2,
                                  group["eps"], step, opt.adam_w_mode, bias_correction, 0.0)
    return steps


# ================================================================ checkpoint conversions
# The only non-tensor objects DeepSpeed (0.16-0.19) pickles into its checkpoint files, found by
# saving ZeRO 0/1/2/3, fp32 and bf16, 1 and 2 ranks, with and without CPU offload, and by
# converting them to universal checkpoints: the loss scaler (DynamicLossScaler under fp16), the
# ZeRO stage enum and the fragment addresses of the ZeRO-1/2 optimizer. Everything else in those
# files is tensors, numbers, strings and containers, which weights_only loading accepts.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _safe_globals() -> list[Any]:
    import importlib

    out = []
    for dotted in DEEPSPEED_SAFE_GLOBALS:
        module, name = dotted.rsplit(".", 1)
        out.append(getattr(importlib.import_module(module), name))
    return out


def load_weights_only(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` with DeepSpeed's few checkpoint classes allowed: a
    file whose pickle would run code (or construct anything else) is refused, naming the file.

    mmap=True maps the tensor bytes instead of reading them, so checking a large file costs its
    pickle, not its size (zip-format files only; older formats are read).
    """
    import zipfile

    from .weights import CheckpointError

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - a pickle with code, a truncated file, not a torch file at all
        raise CheckpointError(f"{path}: not loadable with torch.load(weights_only=True) ({_load_error(e)}); "
                              "a checkpoint file must not need code to load") from None


def _load_error(e: Exception) -> str:
    """torch's weights_only message in one short clause (it spans several lines of advice)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
        text = " ".join(text.split()).split(" Please use ")[0].split(" Check the documentation")[0]
    else:
        text = " ".join(text.split())
    return f"{type(e).__name__}: {text[:200]}"


def convert_to_universal(checkpoint_dir: str | os.PathLike, tag: str, output_tag: str | None = None) -> str:
    """Convert `checkpoint_dir/tag` (ZeRO 1/2/3) into a DeepSpeed universal checkpoint
    `checkpoint_dir/<tag>_universal` that loads on any number of ranks. vilbert-ds does not
    record DeepSpeed's UNIVERSAL_CHECKPOINT_INFO (a Megatron convention), hence
    `inject_missing_state`. Run on one process.

    DeepSpeed reads the source files with weights_only=False: a directory that is not this
    run's own must pass `checkpoint.verify_untrusted` first. The output is written to
    `.<output_tag>.partial<pid>` and renamed when complete; a failed conversion removes its partial
    directory, and partial directories left by a killed conversion are removed on the next call.
    """
    import argparse
    import shutil

    from deepspeed.checkpoint import ds_to_universal

    from .weights import remove_stale_temporaries

    output_tag = output_tag or f"{tag}_universal"
    src = Path(checkpoint_dir) / tag
    dst = Path(checkpoint_dir) / output_tag
    for stale in remove_stale_temporaries(Path(checkpoint_dir), "*_universal"):
        log.info("removed %s, left by an interrupted universal conversion", stale)
    if dst.exists():
        return output_tag
    tmp = Path(checkpoint_dir) / f".{output_tag}.partial{os.getpid()}"
    args = argparse.Namespace(input_folder=str(src), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        ds_to_universal.main(args)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return output_tag


def consolidated_fp32_state(checkpoint_dir: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 module state of a checkpoint, from the ZeRO partitions (fp32 master
    weights) when there are any, else from the module file.

    DeepSpeed's consolidation reads every `*_model_states.pt` / `*_optim_states.pt` with
    weights_only=False: a directory that is not this run's own must pass
    `checkpoint.verify_untrusted` first (`checkpoint.load_consolidated` does both).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(checkpoint_dir) / tag
    # mp_rank_00_model_states.pt (ZeRO 0-2) or zero_pp_rank_0_mp_rank_00_model_states.pt (ZeRO-3)
    files = sorted(path.glob("mp_rank_*_model_states.pt")) or sorted(path.glob("zero_pp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{path}: no *model_states.pt (not a DeepSpeed checkpoint)")
    module = {k: v for k, v in load_weights_only(files[0])["module"].items() if torch.is_tensor(v)}
    if any(path.glob("*optim_states.pt")) and not (path / "zero").is_dir():
        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
        except ValueError as e:  # ZeRO-0 saves optimizer state too, but not partitioned
            log.info("%s: not a ZeRO-partitioned checkpoint (%s); reading the module file", path, e)
        else:
            state = {k: v.float() for k, v in state.items()}
            # Parameters without optimizer state (frozen: q_dense*) are absent from the ZeRO-1/2
            # partitions of a multi-rank checkpoint; the module file has them (stages 0-2).
            for key, value in module.items():
                if value.numel() > 0:  # ZeRO-3 module files hold empty placeholders
                    state.setdefault(key, value.float())
            return state
    dtypes = {v.dtype for v in module.values()}
    if dtypes - {torch.float32}:
        log.warning("%s: module weights are %s; the fp32 export is upcast from them", files[0], sorted(map(str, dtypes)))
    return {k: v.float() for k, v in module.items()}
