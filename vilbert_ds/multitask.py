"""12-in-1 multi-task training: `vilbert-ds multitask --tasks vqa,gqa,nlvr2 --deepspeed ds.json`.

Also `deepspeed -m vilbert_ds.multitask ...`, `torchrun -m ...`, `srun python -m ...`. The
schedule is the original `train_tasks.py`'s on the same DeepSpeed engine as pretraining:

    per iteration: schedule.step()
                   for task in sampler.tasks_at(iteration):      # the same list on every rank
                       batch of that task -> forward (its heads only, task token = its id)
                       engine.backward(loss * loss_scale[task]); engine.step()
                   evaluate the tasks that are due (stop-and-go sees the scores)

One optimizer update per task per iteration (`gradient_accumulation_steps` must be 1), the LR
schedule stepped once per iteration, loss scale lr_task / min lr. All ranks draw the same
tasks from (seed, iteration), so no rank runs a module the others skip (ZeRO-3 is safe) and no
communication decides the schedule. Heads other tasks use get no gradient. Checkpoints hold the
iteration, each task's loader position, the sampler (stop-and-go) state and the RNG states;
`--resume auto` continues exactly where a killed run stopped.

Per task, the global batch is the registry's `batch_size` (or `tasks.batch_size.<task>`),
split evenly over ranks by `task_micro_batch`; DeepSpeed's own batch numbers only label
its bookkeeping here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import yaml
from torch import nn

from .checkpoint import (CheckpointError, CheckpointManager, atomic_write_text, capture_rng, plan_resume, restore_rng,
                         verify_source)
from .config import ConfigError, ModelSection, OptimSection, TrainSection, _build_section, apply_overrides, resolve_config_path, split_overrides
from .distributed import DistEnv, init_distributed, shutdown_distributed
from .engine import (DeepSpeedConfigError, WarmupLinearSchedule, build_engine, enable_activation_checkpointing, engine_float_dtype,
                     load_ds_config, param_groups, validate_ds_config, warmup_steps_for)
from .metrics import MetricsConfig, MetricsLogger
from .model import ViLBert, resolve_config
from .data.config import redact
from .data.tokenizer import load_tokenizer
from .tasks.base import TaskBatch, TaskFamily
from .tasks.label_maps import write_run_label_maps
from .tasks.loader import EvalLoader, TaskDataConfig, build_task_loader, evaluate_task
from .tasks.registry import Registry, TaskConfig, build_family, load_registry, select_tasks
from .tasks.sampler import SamplerConfig, TaskSampler, build_sampler, eval_due
from .trainer import EXIT_DONE, EXIT_PREEMPTED

log = logging.getLogger("vilbert_ds.multitask")

EXIT_REFUSED = 2
# parameters a pretrained (CC) model lacks: initialised randomly, as the original's from_pretrained
TASK_PARAMETER_PREFIXES = ("vil_prediction", "vil_prediction_gqa", "vil_binary_prediction", "vil_logit",
                           "vil_tri_prediction", "vision_logit", "linguisic_logit", "bert.embeddings.task_embeddings")


# ============================================================================== config
@dataclass
class TasksSection:
    """Which tasks, their batch sizes, the sampler and evaluation during training."""

    names: str | list[str] = ""  # "vqa,gqa", "1-2-15", ["vqa", "gqa"], "twelve_in_one"; --tasks overrides
    registry: str = ""  # tasks.yaml ("" = the packaged one)
    data_root: str = ""  # replaces {data_root} in the registry paths ("" = the registry file's data_root)
    batch_size: dict[str, int] = field(default_factory=dict)  # global batch per task (default: the registry's)
    eval_batch_size: dict[str, int] = field(default_factory=dict)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    head_lr: float | None = 1e-4  # lr of parameters named vil_* (the original); null = the base lr
    iters_per_epoch: int | None = None  # default: the longest task loader (the original's median_num_iter)
    evaluate: bool = True  # evaluate each task on its val split when due (drives stop-and-go)
    eval_max_batches: int | None = None  # cap per evaluation during training (None = the whole split)
    final_eval: bool = True  # evaluate every task at the end and write prediction files

    def __post_init__(self) -> None:
        if isinstance(self.sampler, Mapping):
            self.sampler = SamplerConfig(**self.sampler)
        if self.head_lr is not None and not self.head_lr > 0:
            raise ConfigError(f"tasks.head_lr={self.head_lr}: must be > 0 (or null)")
        if self.iters_per_epoch is not None and self.iters_per_epoch < 1:
            raise ConfigError(f"tasks.iters_per_epoch={self.iters_per_epoch}: must be >= 1")
        for key in ("batch_size", "eval_batch_size"):
            bad = {k: v for k, v in getattr(self, key).items() if int(v) < 1}
            if bad:
                raise ConfigError(f"tasks.{key}: {bad} must be >= 1")


@dataclass
class MultiTaskConfig:
    tasks: TasksSection = field(default_factory=TasksSection)
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=lambda: TrainSection(output_dir="runs/multitask", epochs=20, seed=0))
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "<config>") -> "MultiTaskConfig":
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: a multi-task config must be a mapping of sections")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown sections {unknown}; valid: {sorted(known)}")
        defaults = cls()
        sections = {}
        for name in known:
            if name not in raw:
                continue
            base = dataclasses.asdict(getattr(defaults, name)) if name == "train" else {}
            section_cls = type(getattr(defaults, name))
            sections[name] = _build_section(section_cls, {**base, **(raw[name] or {})}, f"{source}: {name}")
        return cls(**sections)

    @classmethod
    def load(cls, path: str | None, overrides: list[str] = (), defaults: list[str] = ()) -> "MultiTaskConfig":
        """`defaults` (section.key=value) < the YAML file < `overrides`."""
        raw: dict[str, Any] = {}
        apply_overrides(raw, list(defaults))
        source = "<defaults>"
        if path:
            p = resolve_config_path(path)
            _deep_merge(raw, yaml.safe_load(p.read_text(encoding="utf-8")) or {})
            source = str(p)
        apply_overrides(raw, list(overrides))
        return cls.from_dict(raw, source)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["data"]["storage_options"] = {k: "***" for k in self.data.storage_options}
        return redact(out)  # URLs with credentials or signatures too


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> None:
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def task_micro_batch(global_batch: int, world_size: int, task: str) -> int:
    """The one place a task's global batch is divided over ranks."""
    if global_batch % world_size:
        raise ConfigError(f"task {task}: global batch {global_batch} is not divisible by {world_size} ranks "
                          f"(set tasks.batch_size.{task})")
    return global_batch // world_size


# ============================================================================== model
def task_model_config(section: ModelSection) -> dict[str, Any]:
    """The config `build_task_model` builds (as a dict), read without building anything: a resume
    compares it with the checkpoint's before any process group starts."""
    from .checkpoint import source_model_config
    from .pretrain import _text_init_path
    from .weights import config_from_hf_bert

    overrides = {"with_task_heads": True, "task_specific_tokens": True, **section.overrides}
    if section.init_from:
        return resolve_config(source_model_config(section.init_from), **overrides).to_dict()
    if section.init_text_from:
        return config_from_hf_bert(_text_init_path(section.init_text_from), base=resolve_config(section.config),
                                   **overrides).to_dict()
    return resolve_config(section.config, **overrides).to_dict()


def build_task_model(section: ModelSection) -> ViLBert:
    """ViLBERT with task heads and task tokens. `init_from` (a vilbert-ds model directory, e.g. a
    converted pretrained or 12-in-1 checkpoint) sets every weight it has; heads and task tokens it
    lacks start random, like the original's from_pretrained."""
    from .pretrain import _text_init_path
    from .weights import WEIGHTS_NAME, config_from_hf_bert, load_hf_bert, load_into

    overrides = {"with_task_heads": True, "task_specific_tokens": True, **section.overrides}
    if section.init_from:
        from safetensors.torch import load_file

        path = Path(section.init_from)
        model = ViLBert(resolve_config(str(path), **overrides))
        report = load_into(model, load_file(str(path / WEIGHTS_NAME)), allow_missing=list(TASK_PARAMETER_PREFIXES),
                           source=str(path))
        if report.missing:
            log.info("from %s: %d task tensors start random (%s ...)", path, len(report.missing), report.missing[:3])
        return model
    if section.init_text_from:
        text = _text_init_path(section.init_text_from)
        model = ViLBert(config_from_hf_bert(text, base=resolve_config(section.config), **overrides))
        load_hf_bert(model, text)
        return model
    return ViLBert(resolve_config(section.config, **overrides))


class MultiTaskObjective(nn.Module):
    """ViLBERT + every selected task's loss: `forward(batch) -> (loss, {"score"})`, dispatched on
    `batch.task`. Families are plain objects (no parameters): the heads are the model's."""

    def __init__(self, model: ViLBert, families: Mapping[str, TaskFamily]):
        super().__init__()
        self.model = model
        self.families = dict(families)

    def forward(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        family = self.families[batch.task]
        return family.loss(family.forward(self.model, batch), batch)


def lr_scale_fn(base_lr: float, head_lr: float | None, bert_lr_scale: float):
    """Per-parameter lr multiplier: vil_* heads at head_lr (the original's 1e-4), the BERT text
    stream at bert_lr_scale, everything else at the base lr."""
    from .engine import text_stream_scale

    text = text_stream_scale(bert_lr_scale)
    head = (head_lr / base_lr) if head_lr else 1.0
    return lambda name: head if "vil_" in name else text(name)


# ============================================================================== trainer
class TaskStream:
    """Endless batches of one task's loader; a new loader epoch starts when one is exhausted."""

    def __init__(self, loader):
        self.loader = loader
        self.epoch = 0
        self._it = None

    def start(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader.set_epoch(epoch)
        self._it = None

    def next(self) -> TaskBatch:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
                self.epoch += 1
                self.loader.set_epoch(self.epoch)
        raise RuntimeError(f"loader {getattr(self.loader, 'name', '?')} yields no batches")

    def close(self) -> None:
        self._it = None


@dataclass
class MultiTaskOptions:
    total_iterations: int
    iters_per_epoch: int
    stop_at: int | None = None
    save_every: int = 1000
    log_every: int = 10
    evaluate: bool = True
    eval_max_batches: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class MultiTaskState:
    iteration: int = 0  # iterations done
    epoch: int = 0  # multi-task epochs done (iters_per_epoch iterations each)
    updates: dict[str, int] = field(default_factory=dict)  # optimizer updates per task
    examples: dict[str, int] = field(default_factory=dict)  # training examples seen per task (all ranks)
    val_scores: dict[str, float] = field(default_factory=dict)  # last validation score per task


class MultiTaskTrainer:
    def __init__(self, *, engine, families: Mapping[str, TaskFamily], loaders: Mapping[str, Any],
                 eval_loaders: Mapping[str, EvalLoader], sampler: TaskSampler, schedule: WarmupLinearSchedule,
                 checkpoints: CheckpointManager, logger: MetricsLogger, stop, options: MultiTaskOptions,
                 env: DistEnv, float_dtype: torch.dtype, micro_batches: Mapping[str, int]):
        self.engine, self.families, self.sampler, self.schedule = engine, dict(families), sampler, schedule
        self.streams = {t: TaskStream(loader) for t, loader in loaders.items()}
        self.eval_loaders = dict(eval_loaders)
        self.checkpoints, self.logger, self.stop, self.opt, self.env = checkpoints, logger, stop, options, env
        self.float_dtype = float_dtype
        self.micro = dict(micro_batches)
        self.tasks = list(self.families)
        self.scales = sampler.loss_scales()
        self.state = MultiTaskState(updates={t: 0 for t in self.tasks}, examples={t: 0 for t in self.tasks})
        self._sums = {t: torch.zeros(3, dtype=torch.float64) for t in self.tasks}  # loss, score, updates
        self._window_start = time.perf_counter()

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.state.iteration, "epoch": self.state.epoch, "updates": dict(self.state.updates),
                "examples": dict(self.state.examples), "val_scores": dict(self.state.val_scores),
                "task_epochs": {t: s.epoch for t, s in self.streams.items()}, "sampler": self.sampler.state_dict(),
                "schedule": self.schedule.state_dict(), "world_size": self.env.world_size, "tasks": self.tasks,
                "micro_batches": self.micro}

    def save(self) -> float:
        rank_state = {"rng": capture_rng(), "loaders": {t: s.loader.state_dict() for t, s in self.streams.items()}}
        meta = {**self.opt.meta, "iteration": self.state.iteration, "updates": self.state.updates}
        return self.checkpoints.save(self.engine, self.state.iteration, client_state={"multitask": self.state_dict()},
                                     rank_state=rank_state, meta=meta)

    def resume(self, plan) -> None:
        client_state, rank_state = self.checkpoints.load(self.engine, plan)
        m = client_state.get("multitask")
        if m is None:
            raise CheckpointError(f"{plan.directory / plan.tag}: not a multi-task checkpoint (no 'multitask' state)")
        if m["tasks"] != self.tasks:
            raise CheckpointError(f"{plan.directory / plan.tag} trained tasks {m['tasks']}; this run has {self.tasks}")
        self.state = MultiTaskState(iteration=int(m["iteration"]), epoch=int(m["epoch"]), updates=dict(m["updates"]),
                                    examples=dict(m["examples"]), val_scores=dict(m["val_scores"]))
        self.sampler.load_state_dict(m["sampler"])
        self.schedule.load_state_dict(m["schedule"])
        same = int(m["world_size"]) == self.env.world_size and m["micro_batches"] == self.micro
        for t, stream in self.streams.items():
            stream.start(int(m["task_epochs"][t]))
            if same and rank_state is not None:
                stream.loader.load_state_dict(rank_state["loaders"][t])
        if same and rank_state is not None:
            restore_rng(rank_state["rng"])
        else:
            torch.manual_seed(hash((self.state.iteration, self.env.rank)) % 2**31)
            log.warning("resumed on %d ranks from a %d-rank checkpoint: each task restarts its current epoch",
                        self.env.world_size, m["world_size"])
        log.info("resumed from %s at iteration %d", plan.directory / plan.load_tag, self.state.iteration)

    # -------------------------------------------------------------------- loop
    def fit(self) -> int:
        if self.state.iteration == 0:
            for stream in self.streams.values():
                stream.start(0)
        end = min(self.opt.total_iterations, self.opt.stop_at or self.opt.total_iterations)
        self.engine.train()
        status = EXIT_DONE
        last_saved = self.state.iteration
        try:
            while self.state.iteration < end:
                if self.stop is not None and self.stop.should_stop(self.state.iteration):
                    log.warning("stop signal (%s): saving at iteration %d", self.stop.received, self.state.iteration)
                    status = EXIT_PREEMPTED
                    break
                self._iteration()
                it = self.state.iteration
                row = self._evaluate_due(it)
                if it % self.opt.iters_per_epoch == 0:
                    if self.sampler.gate.end_epoch(self.state.epoch):
                        row["sampler/reset"] = 1.0
                    self.state.epoch += 1
                if it % self.opt.log_every == 0 or it == end or row:
                    self._log(row)
                if it % self.opt.save_every == 0 and it < end:
                    self.save()
                    last_saved = it
            if self.state.iteration != last_saved or status == EXIT_PREEMPTED:
                self.save()
        finally:
            for stream in self.streams.values():
                stream.close()
        return status

    def _iteration(self) -> None:
        engine = self.engine
        self.schedule.step()  # once per iteration, before its updates (the original)
        for task in self.sampler.tasks_at(self.state.iteration):
            batch = self.streams[task].next().to(engine.device, float_dtype=self.float_dtype)
            if batch.task != task:
                raise RuntimeError(f"the {task} loader produced a batch of task {batch.task!r}")
            loss, metrics = engine(batch)
            engine.backward(loss * self.scales[task])
            engine.step()
            # summed on the device: reading the values here would make every update wait for it
            score = torch.as_tensor(metrics["score"], dtype=torch.float64, device=engine.device)
            one = torch.ones((), dtype=torch.float64, device=engine.device)
            self._sums[task] = self._sums[task].to(engine.device) + torch.stack([loss.detach().double(), score, one])
            self.state.updates[task] += 1
            self.state.examples[task] += self.micro[task] * self.env.world_size
        self.state.iteration += 1

    def evaluate(self, task: str, max_batches: int | None = None, *,
                 standard: bool = False) -> tuple[dict[str, float], Any]:
        """Collective: every rank scores its slice; the records are merged without duplicates.

        During training (`standard=False`) every family is scored per batch, as the original's
        validation did (retrieval: the 4-option accuracy), capped at `max_batches`. The final
        evaluation (`standard=True`) uses the task's standard metric: families whose metric is not
        per example (retrieval ranks every caption against every image, ~5M pairs on COCO)
        evaluate the whole split themselves."""
        self.engine.eval()
        family, model, loader = self.families[task], self.engine.module.model, self.eval_loaders[task]
        evaluate_split = getattr(family, "evaluate_split", None) if standard else None
        try:
            if evaluate_split is not None:
                metric = evaluate_split(model, loader, self.engine.device, float_dtype=self.float_dtype)
            else:
                metric = evaluate_task(model, family, loader, self.engine.device, self.float_dtype, max_batches).gather()
        finally:
            self.engine.train()
        return metric.result(), metric

    def _evaluate_due(self, it: int) -> dict[str, float]:
        row: dict[str, float] = {}
        if not self.opt.evaluate:
            return row
        for task in self.tasks:
            if task in self.eval_loaders and eval_due(it, len(self.streams[task].loader), self.opt.total_iterations):
                result, _ = self.evaluate(task, self.opt.eval_max_batches)
                stopped = self.sampler.gate.report(task, result["score"])
                self.state.val_scores[task] = result["score"]
                row[f"val/{task}/score"] = result["score"]
                row[f"sampler/{task}/stopped"] = float(stopped)
        return row

    def _log(self, extra: dict[str, float]) -> None:
        """Collective: one all-reduce of the per-task sums since the last row."""
        local = torch.stack([self._sums[t].to(self.engine.device) for t in self.tasks])
        if dist.is_available() and dist.is_initialized() and self.env.world_size > 1:
            dist.all_reduce(local, op=dist.ReduceOp.SUM)
            local = local.cpu()
        seconds = time.perf_counter() - self._window_start
        row: dict[str, float] = {}
        probs = self.sampler.probabilities(self.state.iteration)
        stopped = self.sampler.gate.stopped()
        updates = 0.0
        for t, (loss, score, n) in zip(self.tasks, local.tolist()):
            if n:
                row[f"train/{t}/loss"] = loss / n
                row[f"train/{t}/score"] = score / n
            updates += n / self.env.world_size
            row[f"sampler/{t}/prob"] = probs[t]
            row[f"sampler/{t}/stopped"] = float(stopped[t])
            row[f"train/{t}/updates"] = float(self.state.updates[t])
        row["opt/lr"] = max(self.schedule.get_last_lr())
        row["perf/updates_per_s"] = updates / max(seconds, 1e-9)
        row["run/epoch"] = float(self.state.epoch)
        row.update(extra)
        self.logger.log(self.state.iteration, row)
        self._sums = {t: torch.zeros(3, dtype=torch.float64) for t in self.tasks}
        self._window_start = time.perf_counter()

    def final_eval(self, out_dir: Path) -> dict[str, dict[str, float]]:
        """Every task on its val split; rank 0 writes metrics and server-format predictions."""
        results = {}
        for task in self.tasks:
            if task not in self.eval_loaders:
                continue
            result, metric = self.evaluate(task, standard=True)
            results[task] = result
            if self.env.is_main:
                split = self.eval_loaders[task].split
                self.families[task].write_predictions(metric, out_dir / f"{task}_{split}_predictions.json")
                atomic_write_text(out_dir / f"{task}_{split}_metrics.json", json.dumps(result, indent=1) + "\n")
        if results:
            self.logger.log(self.state.iteration, {f"final/{t}/{k}": v for t, r in results.items() for k, v in r.items()})
        return results


# ============================================================================== run
def resolve_tasks(cfg: MultiTaskConfig, cli_tasks: str | None) -> tuple[Registry, list[TaskConfig]]:
    registry = load_registry(cfg.tasks.registry or None, data_root=cfg.tasks.data_root or None)
    spec = cli_tasks or cfg.tasks.names
    if not spec:
        raise ConfigError("no tasks: pass --tasks vqa,gqa,... (or tasks.names in the config)")
    chosen = select_tasks(registry, spec)
    for t in chosen:
        if not t.implemented:
            raise ConfigError(f"task {t.name}: family {t.family!r} is not implemented (vilbert_ds/tasks/registry.py)")
    return registry, chosen


def _init_from_checkpoint(spec: str, run_dir: Path, env: DistEnv) -> str:
    """A model directory stays as is; a run / checkpoint directory is exported once (rank 0)
    into run_dir/init_model and every rank loads that."""
    p = Path(spec)
    if (p / "config.json").exists() and (p / "model.safetensors").exists():
        return str(p)
    target = run_dir / "init_model"
    if env.is_main and not (target / "model.safetensors").exists():
        from .checkpoint import export_fp32

        export_fp32(spec, target)
    if dist.is_available() and dist.is_initialized() and env.world_size > 1:
        dist.barrier()
    return str(target)


def run(cfg: MultiTaskConfig, settings, env: DistEnv, *, cli_tasks: str | None = None, resume: str = "none") -> int:
    from .pretrain import setup_logging
    from .preemption import StopSignal, finish_stop

    registry, chosen = resolve_tasks(cfg, cli_tasks)
    run_dir = Path(cfg.train.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    plan = plan_resume(resume, ckpt_dir, world_size=env.world_size, zero_stage=settings.zero_stage,
                       precision=settings.precision)
    setup_logging(env, run_dir)
    init_distributed(env, init_timeout_s=cfg.train.init_timeout_s, timeout_s=cfg.train.timeout_s)
    stop = StopSignal(check_every=cfg.train.check_stop_every)
    if cfg.model.init_from:
        cfg.model.init_from = _init_from_checkpoint(cfg.model.init_from, run_dir, env)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    if cfg.train.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    model = build_task_model(cfg.model)
    tokenizer = load_tokenizer(cfg.data.vocab or None)
    families = {t.name: build_family(t, tokenizer) for t in chosen}
    micro = {t.name: task_micro_batch(int(cfg.tasks.batch_size.get(t.name, t.batch_size)), env.world_size, t.name)
             for t in chosen}
    eval_micro = {t.name: max(1, int(cfg.tasks.eval_batch_size.get(t.name, t.eval_batch_size)) // env.world_size)
                  for t in chosen}
    objective = MultiTaskObjective(model, families)
    if settings.activation_checkpointing:
        enable_activation_checkpointing(model, settings)
    groups = param_groups(model, lr=settings.lr, weight_decay=settings.weight_decay,
                          lr_scale=lr_scale_fn(settings.lr, cfg.tasks.head_lr, cfg.optim.bert_lr_scale))
    checkpoints = CheckpointManager(ckpt_dir, keep_last=cfg.train.keep_last, rank=env.rank, world_size=env.world_size)
    if plan is not None:
        checkpoints.prepare(plan)
    engine = build_engine(objective, settings, groups, load_universal=bool(plan and plan.universal))
    torch.manual_seed(cfg.train.seed + 1 + env.rank)  # dropout differs between ranks
    loaders = {t.name: build_task_loader(families[t.name], t.splits.train, cfg.data, rank=env.rank,
                                         world_size=env.world_size, micro_batch_size=micro[t.name], seed=cfg.train.seed)
               for t in chosen}
    eval_loaders = {}
    if cfg.tasks.evaluate or cfg.tasks.final_eval:
        eval_loaders = {t.name: EvalLoader(families[t.name], t.splits.val, cfg.data, rank=env.rank,
                                           world_size=env.world_size, micro_batch_size=eval_micro[t.name], num_workers=0)
                        for t in chosen}
    iters_per_epoch = cfg.tasks.iters_per_epoch or max(len(loader) for loader in loaders.values())
    total = cfg.train.total_steps or cfg.train.epochs * iters_per_epoch
    schedule = WarmupLinearSchedule(engine.optimizer, total, warmup_steps_for(total, cfg.optim.warmup_fraction))
    sizes = {t.name: loaders[t.name].epoch_total for t in chosen}
    sampler = build_sampler([t.name for t in chosen], sizes, {t.name: t.lr for t in chosen}, cfg.tasks.sampler)
    meta = {"zero_stage": settings.zero_stage, "precision": settings.precision, "module_prefix": "model.",
            "model_config": model.config.to_dict(), "total_iterations": total, "tasks": [t.name for t in chosen]}
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        (run_dir / "ds_config.json").write_text(json.dumps(redact(settings.config), indent=2) + "\n", encoding="utf-8")
        write_run_label_maps(run_dir, families, cfg.model.init_from)  # what the answer heads will mean
        logger = MetricsLogger.for_run(run_dir, cfg.metrics, run_name=run_dir.name, config=cfg.to_dict())
    else:
        logger = MetricsLogger.null()
    options = MultiTaskOptions(total_iterations=total, iters_per_epoch=iters_per_epoch, stop_at=cfg.train.stop_at_step,
                               save_every=cfg.train.save_every, log_every=cfg.metrics.log_every,
                               evaluate=cfg.tasks.evaluate, eval_max_batches=cfg.tasks.eval_max_batches, meta=meta)
    trainer = MultiTaskTrainer(engine=engine, families=families, loaders=loaders, eval_loaders=eval_loaders,
                               sampler=sampler, schedule=schedule, checkpoints=checkpoints, logger=logger, stop=stop,
                               options=options, env=env, float_dtype=engine_float_dtype(engine), micro_batches=micro)
    if plan is not None:
        trainer.resume(plan)
    log.info("multi-task: %s on %d ranks, micro-batches %s, %d iterations of %d per epoch (%d done), sampler %s, "
             "loss scales %s, ZeRO-%d %s", [t.name for t in chosen], env.world_size, micro, total, iters_per_epoch,
             trainer.state.iteration, sampler.kind, trainer.scales, settings.zero_stage, settings.precision)
    try:
        status = trainer.fit()
        if status == EXIT_DONE and trainer.state.iteration >= total and cfg.tasks.final_eval:
            results = trainer.final_eval(run_dir / "eval")
            if env.is_main:
                print("final validation: " + ", ".join(f"{t} {r['score']:.4f}" for t, r in results.items()), flush=True)
    finally:
        logger.close()
        stop.restore()
    if status == EXIT_PREEMPTED:
        status = finish_stop(env, stop)  # requeues the job under SLURM (rank 0); exit status 75
    else:
        shutdown_distributed()  # all ranks leave together: barrier + destroy_process_group
    if env.is_main:
        what = "stopped by signal" if status == EXIT_PREEMPTED else "done"
        print(f"multitask {what}: iteration {trainer.state.iteration}/{total}, updates {trainer.state.updates}, "
              f"run directory {run_dir}", flush=True)
    return status


# ============================================================================== CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default=None, help="vqa,gqa,... or the original 1-2-15 (default: tasks.names)")
    parser.add_argument("--config", default=None, help="multi-task YAML (or a packaged preset: multitask_12in1)")
    parser.add_argument("--deepspeed", required=True, metavar="JSON", help="DeepSpeed config (gradient_accumulation_steps 1)")
    parser.add_argument("--resume", default="none", help="none | auto | PATH (see vilbert-ds pretrain)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides (tasks.sampler.kind=temperature ...); ds.<key>=<value> for DeepSpeed")


def prepare(args: argparse.Namespace, env: DistEnv, *, command: str, defaults: list[str] = (), extra: list[str] = ()):
    """Configs checked before any process group starts. Returns (cfg, settings) or raises.
    `defaults` rank below the YAML file, `extra` above it (with the command-line overrides)."""
    train_overrides, ds_overrides = split_overrides(list(extra) + list(args.overrides))
    cfg = MultiTaskConfig.load(args.config, train_overrides, defaults=list(defaults))
    if cfg.model.init_from:
        verify_source(cfg.model.init_from)  # nothing in it may run code, and refused before any rank waits
    settings = validate_ds_config(load_ds_config(args.deepspeed, ds_overrides), source=args.deepspeed,
                                  world_size=env.world_size)
    accumulation = settings.config.get("gradient_accumulation_steps", 1)
    if accumulation not in (1, "auto"):
        raise ConfigError(f"{args.deepspeed}: gradient_accumulation_steps={accumulation}; {command} makes one optimizer "
                          f"update per task batch and needs 1")
    _, chosen = resolve_tasks(cfg, getattr(args, "tasks", None))
    from .data import storage

    for t in chosen:  # shards must exist before any rank starts
        for split in (t.splits.train, t.splits.val):
            url = f"{t.split_dir(split)}/manifest.json"
            if not storage.exists(url, cfg.data.storage_options):
                raise FileNotFoundError(f"task {t.name}: {url} is missing; build it with "
                                        f"`vilbert-ds shards task --task {t.name}`")
    plan_resume(args.resume, Path(cfg.train.output_dir) / "checkpoints", world_size=env.world_size,
                zero_stage=settings.zero_stage, precision=settings.precision,
                model_config=task_model_config(cfg.model) if args.resume != "none" else None)
    return cfg, settings


def main(args: argparse.Namespace) -> int:
    env = DistEnv.from_env()
    try:
        cfg, settings = prepare(args, env, command="multitask")
    except (ConfigError, DeepSpeedConfigError, CheckpointError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"vilbert-ds multitask [rank {env.rank}]: refused: {e}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    return run(cfg, settings, env, cli_tasks=args.tasks, resume=args.resume)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vilbert_ds.multitask", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
