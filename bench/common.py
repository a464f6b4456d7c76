"""Shared pieces of the benchmark suite: environment, machine description, synthetic batches, the
training steps under comparison, timing, peak memory and the result tables.

Every bench command prints tables whose ratios are taken inside ONE run: absolute times move from
run to run on a shared machine, ratios of interleaved measurements much less. Each table carries
the machine and the command that produced it.

Shapes: B batch, L text tokens, R regions (incl. the global region at index 0).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import shlex
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from vilbert_ds.data.batch import PretrainBatch

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


# ============================================================================ environment
def setup_env(gpu: bool = False) -> None:
    """Process-wide settings every bench needs, before deepspeed is imported.

    CPU runs use DeepSpeed's CPU accelerator; the DeepSpeed op cache is the per-machine one of
    `vilbert_ds.ops` (so a bench never rebuilds FusedAdam, and never races another build)."""
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from vilbert_ds.ops import extensions_dir

    extensions_dir()
    for noisy in ("DeepSpeed", "deepspeed", "torch._dynamo", "torch._inductor", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def device_name(gpu: bool) -> str:
    return "cuda" if gpu else "cpu"


def machine() -> dict[str, Any]:
    """What the figures were measured on (printed with every table)."""
    info: dict[str, Any] = {"host": socket.gethostname(), "python": platform.python_version(),
                            "torch": torch.__version__}
    try:
        from importlib.metadata import version

        info["deepspeed"] = version("deepspeed")
    except Exception:  # noqa: BLE001 - metadata missing
        info["deepspeed"] = "?"
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info["cpu"] = cpu
    info["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info["torch_threads"] = torch.get_num_threads()
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().split()
        info["ram_gib"] = round(int(mem[mem.index("MemTotal:") + 1]) / 2**20, 1)
    with contextlib.suppress(OSError):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    info["date"] = time.strftime("%Y-%m-%d %H:%M")
    return info


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ", no GPU"
    return (f"{info['cpu']} ({info['cores']} cores, {info.get('ram_gib', '?')} GiB, "
            f"load {info.get('load_avg_1m', '?')} "
            f"at start){gpu}; torch {info['torch']}, deepspeed {info['deepspeed']}; {info['date']}")


def command_line() -> str:
    argv = [Path(sys.argv[0]).as_posix()] + sys.argv[1:]
    with contextlib.suppress(ValueError):
        argv[0] = Path(sys.argv[0]).resolve().relative_to(REPO).as_posix()
    return "python " + " ".join(shlex.quote(a) for a in argv)


# ================================================================================= tables
@dataclass
class Table:
    """One question's figures. `rows` are dicts keyed by `columns`; `notes` explain the method."""

    title: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        a = abs(value)
        if a >= 1000:
            return f"{value:,.0f}"
        if a >= 100:
            return f"{value:.0f}"
        if a >= 10:
            return f"{value:.1f}"
        if a >= 0.1:
            return f"{value:.2f}"
        if a == 0:
            return "0"
        return f"{value:.3g}"
    return str(value)


def render_text(table: Table) -> str:
    cells = [[fmt(r.get(c)) for c in table.columns] for r in table.rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(table.columns)]
    out = [f"== {table.title}", "  ".join(c.ljust(w) for c, w in zip(table.columns, widths))]
    out.append("  ".join("-" * w for w in widths))
    for row in cells:
        out.append("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    out.extend(f"   note: {n}" for n in table.notes)
    return "\n".join(out)


def render_markdown(table: Table) -> str:
    out = [f"#### {table.title}", "", "| " + " | ".join(table.columns) + " |",
           "|" + "|".join("---" for _ in table.columns) + "|"]
    for r in table.rows:
        out.append("| " + " | ".join(fmt(r.get(c)).replace("|", "/") for c in table.columns) + " |")
    if table.notes:
        out.append("")
        out.extend(f"- {n}" for n in table.notes)
    return "\n".join(out)


def print_tables(tables: Sequence[Table], *, markdown: bool = False, info: dict[str, Any] | None = None,
                 command: str | None = None, file=None) -> None:
    file = file or sys.stdout
    info = info or machine()
    header = f"machine: {machine_line(info)}\ncommand: {command or command_line()}"
    if markdown:
        print(f"Machine: {machine_line(info)}  \nCommand: `{command or command_line()}`\n", file=file)
        for t in tables:
            print(render_markdown(t) + "\n", file=file)
    else:
        print(header, file=file)
        for t in tables:
            print("\n" + render_text(t), file=file)
    file.flush()


def save_json(path: str | os.PathLike, tables: Sequence[Table], info: dict[str, Any], command: str) -> None:
    Path(path).write_text(json.dumps({"machine": info, "command": command, "tables": [t.to_dict() for t in tables]},
                                     indent=1, default=str) + "\n", encoding="utf-8")


def load_json(path: str | os.PathLike) -> tuple[dict[str, Any], str, list[Table]]:
    """(machine, command, tables) of a file written by `save_json`, e.g. on a lent GPU machine."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return raw["machine"], raw["command"], [Table(**t) for t in raw["tables"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not a bench result file ({e})") from None


def report(tables: Sequence[Table], info: dict[str, Any], markdown: bool, json_path: str | None) -> None:
    """The end of each question's command: print the tables (text or Markdown) and, given a
    path, save them as JSON with the machine and command line."""
    print_tables(tables, markdown=markdown, info=info)
    if json_path:
        save_json(json_path, tables, info, command_line())


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0 or (isinstance(value, float) and math.isnan(value)):
        return None
    return value / base


# ================================================================================ shapes
@dataclass(frozen=True)
class Shape:
    """The original sequence lengths: CC pretraining 36 tokens / 36+1 regions; VQA 23 / 100+1."""

    name: str  # pretrain | vqa
    text_len: int
    regions: int  # incl. the global region

    def __str__(self) -> str:
        return f"{self.name} L{self.text_len} R{self.regions}"


PRETRAIN = Shape("pretrain", 36, 37)
VQA = Shape("vqa", 23, 101)
SHAPES = {"pretrain": PRETRAIN, "vqa": VQA}
MODEL_CONFIGS = ("tiny", "base_2layer_2conect", "base_6layer_6conect")
SHORT_NAMES = {"tiny": "tiny", "base_2layer_2conect": "2layer_2conect", "base_6layer_6conect": "6layer_6conect"}
VQA_TASK_ID = 1  # TASK1 of the original task table
MASK_PROB = 0.15


def model_config(name: str, shape: Shape, **overrides: Any):
    """The ViLBertConfig of a preset for a shape: pretraining = the original
    BertForMultiModalPreTraining (no task heads); VQA = VILBertForVLTasks with task tokens."""
    from vilbert_ds.model import resolve_config

    vqa = shape.name == "vqa"
    return resolve_config(name, with_task_heads=vqa, task_specific_tokens=vqa, **overrides)


def make_batch(cfg, shape: Shape, batch: int, seed: int = 0):
    """A synthetic batch at `shape` with realistic padding and masking.

    Pretraining: caption lengths uniform in [8, L] tokens incl. [CLS]/[SEP] (CC captions are
    short), 36 real regions, 15% of the real tokens and regions masked as targets, half the
    captions negatives. VQA: question lengths uniform in [6, L], 10-100 real regions + the global
    one, soft answer scores on 1-3 of 3129 answers. Float tensors are float16 as the loaders ship them.
    """
    g = torch.Generator().manual_seed(seed)
    B, L, R = batch, shape.text_len, shape.regions
    vocab = cfg.vocab_size
    if shape.name == "pretrain":
        t_len = torch.randint(8, L + 1, (B,), generator=g)
        r_len = torch.full((B,), R)
    else:
        t_len = torch.randint(6, L + 1, (B,), generator=g)
        r_len = torch.randint(11, R + 1, (B,), generator=g)
    pos_t = torch.arange(L)[None]
    pos_r = torch.arange(R)[None]
    attention_mask = (pos_t < t_len[:, None]).long()
    image_mask = (pos_r < r_len[:, None]).long()
    input_ids = torch.randint(1000, vocab, (B, L), generator=g) * attention_mask
    input_ids[:, 0] = 101
    input_ids[torch.arange(B), t_len - 1] = 102
    image_feat = (torch.rand(B, R, cfg.v_feature_size, generator=g) * image_mask[..., None]).half()
    image_loc = torch.rand(B, R, 5, generator=g) * image_mask[..., None]
    image_loc[:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    common = dict(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids), attention_mask=attention_mask,
                  image_feat=image_feat, image_loc=image_loc, image_mask=image_mask,
                  keys=[f"bench{seed}_{i}" for i in range(B)])
    if shape.name == "pretrain":
        inner = attention_mask.clone()
        inner[:, 0] = 0
        inner[torch.arange(B), t_len - 1] = 0
        lm_pick = (torch.rand(B, L, generator=g) < MASK_PROB) & inner.bool()
        masked_lm_labels = torch.where(lm_pick, input_ids, torch.full_like(input_ids, -1))
        region_pick = (torch.rand(B, R - 1, generator=g) < MASK_PROB) & image_mask[:, 1:].bool()
        image_label = torch.where(region_pick, 1, -1)
        image_target = torch.softmax(torch.randn(B, R - 1, cfg.v_target_size, generator=g) * 3, -1).half()
        is_next = torch.randint(0, 2, (B,), generator=g)
        return PretrainBatch(**common, masked_lm_labels=masked_lm_labels, image_label=image_label,
                             image_target=image_target, is_next=is_next)
    target = torch.zeros(B, cfg.num_vqa_labels)
    for i in range(B):
        answers = torch.randint(0, cfg.num_vqa_labels, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g)
        target[i, answers] = torch.tensor([1.0, 0.6, 0.3][: len(answers)])
    from vilbert_ds.tasks.vl_classifier import ClassifierBatch

    return ClassifierBatch(**common, task_ids=torch.full((B, 1), VQA_TASK_ID), target=target.half(),
                           labeled=torch.ones(B, dtype=torch.bool), task="vqa")


def flops_per_sample(cfg, shape: Shape, *, plain: bool = False) -> float:
    """Analytic training FLOPs of one sample (`vilbert_ds.metrics.vilbert_flops`, x3 for fwd+bwd).

    vilbert-ds counts the heads it runs (MLM and region heads on the ~15% masked positions; the
    VQA classifier); the plain step runs every head on every position, as the original does.
    """
    from vilbert_ds.metrics import vilbert_flops

    L, R = shape.text_len, shape.regions
    if shape.name == "pretrain":
        heads = ("seq_relationship", "text_prediction", "vision_prediction") if plain else ("seq_relationship",)
        masked = dict(masked_tokens=0.0, masked_regions=0.0) if plain else dict(
            masked_tokens=MASK_PROB * (L - 2), masked_regions=MASK_PROB * (R - 1))
        return vilbert_flops(cfg, text_len=L, regions=R, heads=heads, **masked).train
    count = vilbert_flops(cfg, text_len=L, regions=R, heads=("text_prediction", "vision_prediction") if plain else (),
                          task_token=True)
    c = cfg.bi_hidden_size
    vqa_head = 2.0 * c * 2 * c + 2.0 * 2 * c * cfg.num_vqa_labels  # SimpleClassifier 1024 -> 2048 -> 3129
    return 3.0 * (count.forward + vqa_head)


# ============================================================================ objectives
def vqa_family():
    """The package's VQA task family (VL-classifier: its head, BCE x 3129 loss and score) with a
    stand-in answer vocabulary, so that no task shards are needed."""
    from vilbert_ds.tasks.registry import build_family, load_registry

    family = build_family(load_registry()["vqa"])
    family.set_assets({"answers": [f"answer{i}" for i in range(family.config.num_labels)]})
    return family


def build_objective(cfg, shape: Shape, *, plain: bool = False):
    """"Model + loss" modules: `forward(batch) -> (loss, metrics)`.

    vilbert-ds: the package's own objectives (`vilbert_ds.objectives`): pretraining =
    `PretrainObjective`, VQA = `TaskObjective` over the VQA family (VQA head only, BCE-with-logits
    x 3129). Plain: the same model computing every head on every position (the original's
    forward) and the original's losses on the full logits.
    """
    import torch.nn.functional as F
    from torch import nn

    from vilbert_ds.model import ViLBert
    from vilbert_ds.objectives import PretrainObjective, TaskObjective

    model = ViLBert(cfg)
    if not plain:
        return PretrainObjective(model) if shape.name == "pretrain" else TaskObjective(model, {"vqa": vqa_family()})

    class PlainPretrainObjective(nn.Module):
        """The original BertForMultiModalPreTraining step: all heads over every position, then
        CrossEntropy(ignore_index=-1) over [B*L, vocab], masked KL over [B, R-1, 1601]."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, batch):
            out = self.model(batch.input_ids, batch.image_feat, batch.image_loc, batch.token_type_ids,
                             batch.attention_mask, batch.image_mask, heads=None)
            vocab = out.text_prediction.size(-1)
            lm = F.cross_entropy(out.text_prediction.reshape(-1, vocab), batch.masked_lm_labels.reshape(-1),
                                 ignore_index=-1)
            pred_v = out.vision_prediction[:, 1:]
            kl = F.kl_div(F.log_softmax(pred_v, dim=2), batch.image_target, reduction="none")
            picked = (batch.image_label == 1)
            img = torch.sum(kl * picked.unsqueeze(2).float()) / max(int(picked.sum()), 1)
            nsp = F.cross_entropy(out.seq_relationship.reshape(-1, 2), batch.is_next.reshape(-1), ignore_index=-1)
            return lm + img + nsp, {}

    class PlainVqaObjective(nn.Module):
        """The original VILBertForVLTasks step: every head computed, BCE on vil_prediction."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, batch):
            out = self.model(**batch.model_inputs(), heads=None)
            logits = out.vil_prediction
            loss = F.binary_cross_entropy_with_logits(logits, batch.target) * logits.size(1)
            return loss, {}

    return PlainVqaObjective(model) if shape.name == "vqa" else PlainPretrainObjective(model)


def set_attention_impl(module, impl: str) -> None:
    """Switch every attention module of a built model between "sdpa" and "eager" in place."""
    for m in module.modules():
        if hasattr(m, "impl") and hasattr(m, "heads"):
            m.impl = impl


# ================================================================================ steps
def init_single_process_group(gpu: bool) -> None:
    """DeepSpeed engines need a process group; the in-process benches run world size 1. The
    rank variables DeepSpeed reads are (re)set each time: a caller may have restored its env."""
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1)
    if dist.get_world_size() == 1:
        for key in ("RANK", "LOCAL_RANK"):
            os.environ.setdefault(key, "0")
        for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            os.environ.setdefault(key, "1")


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE",
                  "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a launch from a bench process: without this process's own (world size
    1) rank variables, which would override what the launcher gives each rank."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env.update(extra)
    return env


@dataclass(frozen=True)
class StepSpec:
    """One way of running the training step."""

    config: str = "tiny"
    shape: Shape = PRETRAIN
    batch: int = 8
    attention: str = "sdpa"  # sdpa | eager
    # fused_adam (DeepSpeed FusedAdam) | torch_adamw (torch.optim.AdamW, its default implementation) |
    # torch_fused (torch.optim.AdamW(fused=True): the baseline where FusedAdam cannot be built)
    optimizer: str = "fused_adam"
    checkpointing: bool = False  # activation checkpointing of every encoder layer
    compile: bool = False  # torch.compile of the model (DeepSpeed engine.compile)
    precision: str = "fp32"  # fp32 | bf16
    # bf16 at ZeRO-1 gets fp32 gradient accumulation, the path of the shipped
    # ds_configs/zero1_bf16.json (DeepSpeed's BF16_Optimizer; one rank partitions nothing). bf16 at
    # ZeRO-0 goes through DeepSpeed's FP16_Optimizer instead, which accumulates in bf16 and checks
    # every gradient tensor for inf/NaN with a host sync of its own (508 per base-model step).
    zero_stage: int = 0
    plain: bool = False  # the straightforward implementation (no DeepSpeed)
    gpu: bool = False

    def label(self) -> str:
        if self.plain:
            return "plain"
        parts = [self.attention, self.optimizer, self.precision]
        if self.checkpointing:
            parts.append("ckpt")
        if self.compile:
            parts.append("compile")
        return "+".join(parts)


def ds_config(spec: StepSpec, *, lr: float = 1e-4) -> dict[str, Any]:
    """The DeepSpeed config of a bench step: one micro-batch per update, clipping 1.0, AdamW as
    the pretraining config (betas 0.9/0.98, eps 1e-8, wd 0.01)."""
    params: dict[str, Any] = {"lr": lr, "betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": 0.01}
    if spec.optimizer in ("torch_adamw", "torch_fused"):
        params["torch_adam"] = True  # DeepSpeed then builds torch.optim.AdamW (default implementation)
    if spec.optimizer == "torch_fused":
        params["fused"] = True  # passed through to torch.optim.AdamW: one fused kernel, no DeepSpeed op to build
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": params},
        "zero_optimization": {"stage": spec.zero_stage},
    }
    if spec.precision == "bf16":
        config["bf16"] = {"enabled": True}
        if spec.zero_stage == 1:  # as ds_configs/zero1_bf16.json
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    if spec.checkpointing:
        config["activation_checkpointing"] = {}
    return config


class Step:
    """A built training step on a fixed batch: `step()` = batch to device, forward, backward,
    optimizer update, gradients cleared. `holder` is what owns the step's tensors (for memory)."""

    def __init__(self, spec: StepSpec, run: Callable[[], float], holder: Any, float_dtype, batch, samples: int,
                 objective):
        self.spec = spec
        self._run = run
        self.holder = holder
        self.float_dtype = float_dtype
        self.batch = batch
        self.samples = samples
        self.objective = objective

    def step(self) -> float:
        """Runs one step; returns the loss (a host sync, as every logged training step has)."""
        return self._run()

    def close(self) -> None:
        destroy = getattr(self.holder, "destroy", None)  # a DeepSpeed engine: release its buffers and hooks
        if callable(destroy):
            destroy()
        self._run = self.holder = self.batch = self.objective = None
        gc.collect()


def build_step(spec: StepSpec, *, seed: int = 0, zero_options: dict[str, Any] | None = None) -> Step:
    """Build `spec`: the vilbert-ds step through a DeepSpeed engine (as `vilbert_ds.train` builds
    it), or the plain step (eager attention with an explicit mask, every head, one parameter group
    per tensor, torch AdamW in its single-tensor for-loop form, fp32, no DeepSpeed).
    `zero_options` are merged into the `zero_optimization` section (e.g. a shipped config's)."""
    torch.manual_seed(seed)
    device = torch.device(device_name(spec.gpu))
    cfg = model_config(spec.config, spec.shape, attention_impl="eager" if spec.plain else spec.attention)
    objective = build_objective(cfg, spec.shape, plain=spec.plain)
    batch = make_batch(cfg, spec.shape, spec.batch, seed=seed)
    if spec.plain:
        if spec.precision != "fp32" or spec.compile or spec.checkpointing:
            raise ValueError("the plain step is fp32, uncompiled, without checkpointing")
        objective.to(device)
        from vilbert_ds.engine import no_weight_decay

        groups = [{"params": [p], "weight_decay": 0.0 if no_weight_decay(n) else 0.01}
                  for n, p in objective.model.named_parameters() if p.requires_grad]
        opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.98), eps=1e-8, foreach=False, fused=False)
        objective.train()

        def run() -> float:
            b = batch.to(device, float_dtype=torch.float32)
            loss, _ = objective(b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        return Step(spec, run, (objective, opt), torch.float32, batch, spec.batch, objective)

    init_single_process_group(spec.gpu)
    from vilbert_ds.engine import build_training_engine, engine_float_dtype, validate_ds_config

    config = ds_config(spec)
    config["zero_optimization"].update(zero_options or {})
    world = torch.distributed.get_world_size()
    settings = validate_ds_config(config, source=f"bench:{spec.label()}", world_size=world)
    engine = build_training_engine(objective, settings, compile=spec.compile)  # what every training run assembles
    engine.train()
    dtype = engine_float_dtype(engine)

    def run() -> float:
        b = batch.to(engine.device, float_dtype=dtype)
        loss, _ = engine(b)
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    return Step(spec, run, engine, dtype, batch, spec.batch, objective)


# ============================================================================== timing
def sync(gpu: bool) -> None:
    if gpu:
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Per-step wall seconds and process CPU seconds (all threads) of one step variant."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    # Best of the rounds: other jobs on a shared machine only ever add time to a step, so the
    # minimum over interleaved rounds is the steadiest estimate of a step's own cost.
    @property
    def wall_s(self) -> float:
        return min(self.wall) if self.wall else float("nan")

    @property
    def cpu_s(self) -> float:
        return min(self.cpu) if self.cpu else float("nan")


def time_interleaved(steps: dict[str, Step], *, warmup: int, rounds: int, gpu: bool = False,
                     budget_s: float | None = None, before: Callable[[str], None] | None = None,
                     warm: Iterable[str] = ()) -> dict[str, Timing]:
    """Per-step times of each step, measured in interleaved rounds (A B C A B C ...), so that a
    load change on a shared machine hits every variant alike. `before(name)` runs (untimed)
    before each step of `name` (to switch a shared model's attention or checkpointing).
    Stops early (keeping at least 2 rounds) once `budget_s` of timed rounds are spent.

    Process CPU time is kept beside wall time: on an oversubscribed machine it counts the work
    done rather than the wait for a core (on a quiet machine the two agree up to threading).
    Steps named in `warm` get no warmup."""
    warm = set(warm)
    for name, s in steps.items():
        for _ in range(0 if name in warm else warmup):
            if before:
                before(name)
            s.step()
    sync(gpu)
    times = {name: Timing() for name in steps}
    start = time.perf_counter()
    for r in range(rounds):
        for name, s in steps.items():
            if before:
                before(name)
            sync(gpu)
            t0, c0 = time.perf_counter(), time.process_time()
            s.step()
            sync(gpu)
            times[name].wall.append(time.perf_counter() - t0)
            times[name].cpu.append(time.process_time() - c0)
        if budget_s is not None and r >= 1 and time.perf_counter() - start > budget_s:
            break
    return times


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


# ============================================================================== memory
def tensor_storages(roots: Iterable[Any], device: str | None = None, *, follow_grad: bool = True,
                    ) -> dict[tuple[str, int], int]:
    """{(device, data_ptr): bytes} of the distinct tensor storages reachable from `roots`
    (objects, containers, modules, optimizers; DeepSpeed engines included): parameters, their
    gradients and ZeRO-3 partitions, optimizer state, flat buffers. Follows `__dict__`, mappings
    and sequences of objects from torch / deepspeed / vilbert_ds and plain containers."""
    seen_obj: set[int] = set()
    storages: dict[tuple[str, int], int] = {}
    stack = list(roots)
    skip_types = (str, bytes, int, float, bool, type(None), type, torch.device, torch.dtype)
    while stack:
        obj = stack.pop()
        if isinstance(obj, skip_types) or id(obj) in seen_obj:
            continue
        seen_obj.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if device is None or obj.device.type == device:
                with contextlib.suppress(RuntimeError, NotImplementedError):
                    st = obj.untyped_storage()
                    if st.nbytes():
                        storages[(str(obj.device), st.data_ptr())] = st.nbytes()
            if follow_grad and obj.grad is not None:
                stack.append(obj.grad)
            if getattr(obj, "ds_tensor", None) is not None:  # a ZeRO-3 parameter's local partition
                stack.append(obj.ds_tensor)
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, torch.nn.Module):
            stack.extend(obj.parameters(recurse=False))
            stack.extend(obj.buffers(recurse=False))
            stack.extend(obj.children())
            stack.append({k: v for k, v in vars(obj).items() if k not in ("_parameters", "_buffers", "_modules")})
        elif hasattr(obj, "__dict__") and (isinstance(obj, torch.optim.Optimizer) or not callable(obj)
                                           or type(obj).__module__.split(".")[0] in ("deepspeed", "vilbert_ds")):
            with contextlib.suppress(TypeError):
                stack.append(vars(obj))
    return storages


def tensor_bytes(roots: Iterable[Any], device: str | None = None) -> int:
    """Bytes of the distinct tensor storages reachable from `roots` (see `tensor_storages`)."""
    return sum(tensor_storages(roots, device).values())


def step_peak_bytes(step: Step, gpu: bool = False) -> tuple[int, int]:
    """(bytes held between steps, peak bytes during one step) of a warmed-up step.

    Held: the bytes reachable from the step's owner (weights, gradients, optimizer state). Peak:
    held plus the most allocated above the step's start during one step (activations,
    gradients, temporaries): on GPU from the caching allocator's counters, on CPU from the
    profiler's allocation events. Memory that bypasses
    PyTorch's allocator (oneDNN scratch, the Python heap) is not counted on either device.
    """
    gc.collect()
    if gpu:
        # Other engines may be alive on the device: count this step's own tensors, plus the
        # allocator's peak above what was allocated when the step began.
        held = tensor_bytes([step.holder], device="cuda")
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step.step()
        torch.cuda.synchronize()
        return held, held + max(0, torch.cuda.max_memory_allocated() - start)
    held = tensor_bytes([step.holder], device="cpu")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step.step()
    return held, held + max(0, _peak_allocated(prof))


def _peak_allocated(prof) -> int:
    """Peak of the running sum of allocations minus frees in a profile (bytes)."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    events.sort()
    total = peak = 0
    for _, size in events:
        total += size
        peak = max(peak, total)
    return peak


@contextlib.contextmanager
def quiet_output():
    """Silence DeepSpeed's prints (stdout) while building engines; errors still surface."""
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield buf


def free(*objs: Any) -> None:
    for o in objs:
        if hasattr(o, "close"):
            o.close()
    gc.collect()
    with contextlib.suppress(Exception):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
