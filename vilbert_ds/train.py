"""Every kind of training, one path: `vilbert-ds pretrain | multitask | finetune` are presets of it.

    parse -> DistEnv -> config -> DeepSpeed config check -> tasks and batch checks -> resume plan
    (once) -> init_distributed -> build (model, objective, engine, streams, sampler) -> Trainer.fit
    -> final evaluation (tasks) -> stop or requeue

Kinds (`config.KINDS`) differ only in their defaults (`config.KIND_DEFAULTS`), their arguments
(`--tasks`; `--task` and `--from`) and what they build: pretraining is one stream of Conceptual
Captions batches under round-robin; multi-task and fine-tuning one stream per task under the
configured sampler. Runs under `deepspeed --module`, `torchrun -m`, `srun python -m` or as one
process (`python -m vilbert_ds.pretrain|multitask|finetune` call this module). Everything that can
be refused is refused before the process group starts, on one line, with exit status 2. Exit
status 0 = done (or `train.stop_at_step` reached), 75 = stopped by a signal after a complete
checkpoint (resume with `--resume auto`).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import CheckpointManager, ResumePlan, export_fp32, plan_resume, verify_source
from .config import ConfigError, TrainConfig, split_overrides, task_micro_batch
from .data.config import redact
from .distributed import DistEnv, init_distributed, shutdown_distributed
from .engine import (LR_AUTO, LRSchedule, base_lr, build_training_engine, engine_float_dtype, load_ds_config, lr_rule,
                     read_batch_sizes, validate_ds_config, warmup_steps_for)
from .metrics import MetricsLogger, peak_tflops, vilbert_flops
from .model import ViLBert
from .model_factory import TASK_PARTS, freeze_text_layers, get_model, model_config, source_kind
from .objectives import PretrainObjective, TaskObjective
from .tasks.label_maps import write_run_label_maps
from .tasks.registry import TaskConfig, build_family, load_registry, select_tasks
from .tasks.sampler import SamplerConfig, StopAndGoConfig, build_sampler
from .trainer import EXIT_DONE, EXIT_PREEMPTED, Trainer, TrainerOptions

log = logging.getLogger("vilbert_ds.train")

EXIT_REFUSED = 2  # a config or resume combination refused before any work started
PRETRAIN_STREAM = "train"


@dataclass
class Job:
    """A run checked before any process group exists."""

    cfg: TrainConfig
    settings: object  # engine.DeepSpeedSettings
    plan: ResumePlan | None
    tasks: list[TaskConfig] = field(default_factory=list)
    micro: dict[str, int] = field(default_factory=dict)  # per-rank task micro-batches
    lr_note: str = ""  # where the base lr came from (logged at start)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)


# ======================================================================== checks
def prepare(args: argparse.Namespace, kind: str, env: DistEnv) -> Job:
    """Configs, tasks, batch sizes and the resume plan, checked before any process group starts."""
    train_overrides, ds_overrides = split_overrides(args.overrides)
    defaults, above = [], []
    if kind == "finetune":
        if "," in args.task:
            raise ConfigError(f"finetune trains one task; got {args.task!r} (use vilbert-ds multitask for several)")
        defaults.append(f"train.output_dir=runs/finetune-{args.task}")
        above.append(f"model.init_from={args.init_from}")
    cfg = TrainConfig.load(args.config, above + train_overrides, kind=kind, defaults=defaults)
    settings = validate_ds_config(load_ds_config(args.deepspeed, ds_overrides), source=args.deepspeed,
                                  world_size=env.world_size)
    if cfg.model.init_from and source_kind(cfg.model.init_from) != "original":  # an original file is read weights_only
        verify_source(cfg.model.init_from)  # nothing in it may run code, and refused before any rank waits
    job = Job(cfg, settings, plan=None)
    if kind == "pretrain" and settings.lr is None:
        raise ConfigError(f"{args.deepspeed}: optimizer.params.lr \"{LR_AUTO}\" takes the tasks' smallest lr; a "
                          "pretraining run has no tasks: set a number (the original: 1e-4)")
    if kind != "pretrain":
        job.tasks = resolve_tasks(cfg, getattr(args, "tasks", None) or getattr(args, "task", None))
        derived = base_lr({t.name: t.lr for t in job.tasks})
        if settings.lr is None:  # the original's rule: base lr = min task lr
            job.settings = settings = settings.with_lr(derived)
            job.lr_note = f"base lr {derived:g} = the tasks' smallest lr (\"{LR_AUTO}\" in {args.deepspeed})"
        else:
            job.lr_note = (f"base lr {settings.lr:g} as set in {args.deepspeed}" + (
                f" (the original would use the tasks' smallest lr, {derived:g}: set optimizer.params.lr to "
                f"\"{LR_AUTO}\")" if settings.lr != derived else ""))
        job.micro = {t.name: task_micro_batch(cfg.tasks.batch_size.get(t.name, t.batch_size), env.world_size,
                                              settings.accumulation, t.name) for t in job.tasks}
        check_task_shards(cfg, job.tasks, job.micro, env.world_size, settings.accumulation)
    # a resume compares the model this run would build with the checkpoint's, before any rank waits
    expected = model_config(cfg.model.init_from, **model_spec(cfg)) if args.resume != "none" else None
    job.plan = plan_resume(args.resume, job.run_dir / "checkpoints", world_size=env.world_size,
                           zero_stage=settings.zero_stage, precision=settings.precision,
                           model_config=expected.to_dict() if expected is not None else None)
    trained = job.plan.meta.get("tasks") if job.plan else None
    if trained is not None and trained != [t.name for t in job.tasks]:
        raise ConfigError(f"{job.plan.directory / job.plan.tag} trained tasks {trained}; this run has "
                          f"{[t.name for t in job.tasks]} (resume with the same --tasks)")
    frozen = job.plan.meta.get("freeze", -1) if job.plan else cfg.model.freeze
    if frozen != cfg.model.freeze:  # the optimizer state holds the trainable parameters only
        raise ConfigError(f"{job.plan.directory / job.plan.tag} trained with model.freeze={frozen}; this run has "
                          f"model.freeze={cfg.model.freeze} (resume with the same value)")
    return job


def resolve_tasks(cfg: TrainConfig, spec: str | None) -> list[TaskConfig]:
    try:
        registry = load_registry(cfg.tasks.registry or None, data_root=cfg.tasks.data_root or None)
        chosen = select_tasks(registry, spec or cfg.tasks.names)
    except KeyError as e:  # the registry's message names the task and the known ones
        raise ConfigError(e.args[0] if e.args else str(e)) from None
    if not chosen:
        raise ConfigError("no tasks: pass --tasks vqa,gqa,... (or tasks.names in the config)")
    for t in chosen:
        if not t.implemented:
            raise ConfigError(f"task {t.name}: family {t.family!r} is not implemented (vilbert_ds/tasks/registry.py)")
    return chosen


def check_task_shards(cfg: TrainConfig, tasks: list[TaskConfig], micro: dict[str, int], world_size: int,
                      accumulation: int) -> None:
    """Every split a run reads exists, and every task's epoch holds one micro-batch per rank."""
    from .data.manifest import load_source

    splits = ["train"] + (["val"] if cfg.tasks.evaluate or cfg.tasks.final_eval else [])
    for t in tasks:
        for which in splits:
            url = f"{t.split_dir(getattr(t.splits, which))}/manifest.json"
            try:
                samples = load_source(url, cfg.data.storage_options, retries=1).num_samples
            except Exception:  # noqa: BLE001 - missing or unreadable: the fix is the same
                raise FileNotFoundError(f"task {t.name}: {url} is missing or unreadable; build it with "
                                        f"`vilbert-ds shards task --task {t.name}`") from None
            if which == "train" and samples < world_size * micro[t.name]:
                fix = max(1, samples // world_size) * world_size * accumulation
                raise ConfigError(f"task {t.name}: a global batch of {micro[t.name] * world_size * accumulation} needs "
                                  f"{micro[t.name] * world_size} training samples per micro-step; {url} has {samples}: "
                                  f"set tasks.batch_size.{t.name}={fix}")


# ======================================================================== build
def model_spec(cfg: TrainConfig) -> dict:
    """The arguments of `model_factory.get_model` / `model_config` for this run's model (task runs
    add task heads and task tokens)."""
    m = cfg.model
    heads = {"with_task_heads": True, "task_specific_tokens": True} if cfg.kind != "pretrain" else {
        "with_task_heads": m.task_heads}
    return dict(config=m.config, overrides={**heads, **m.overrides}, text_from=m.init_text_from)


def build_model(cfg: TrainConfig, run_dir: Path, env: DistEnv) -> ViLBert:
    """The model to train, initialised as configured (`model_factory.get_model`); task heads and
    task tokens a starting model lacks start fresh. A training run or checkpoint to start from is
    exported once (main rank) to run_dir/init_model, which every rank then reads."""
    source = cfg.model.init_from
    if source and source_kind(source) == "checkpoint":
        source = str(run_dir / "init_model")
        if env.is_main and not (run_dir / "init_model" / "model.safetensors").exists():
            export_fp32(cfg.model.init_from, source)
        if env.world_size > 1:
            torch.distributed.barrier()  # the export is complete before any rank reads it
    return get_model(source, **model_spec(cfg), allow_missing=TASK_PARTS if cfg.kind != "pretrain" else ())


def run(job: Job, env: DistEnv, loader_factory=None) -> int:
    """Build everything and train. Assumes a prepared job; starts the process group."""
    from .preemption import StopSignal, finish_stop

    cfg, settings, run_dir, kind = job.cfg, job.settings, job.run_dir, job.cfg.kind
    init_distributed(env, init_timeout_s=cfg.train.init_timeout_s, timeout_s=cfg.train.timeout_s)
    stop = StopSignal(check_every=cfg.train.check_stop_every)  # armed before the slow part
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    if cfg.train.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(cfg, run_dir, env)
    if cfg.model.freeze >= 0:
        frozen = freeze_text_layers(model, cfg.model.freeze)
        log.info("model.freeze=%d: %d text-stream tensors frozen (embeddings + text layers 0..%d)", cfg.model.freeze,
                 len(frozen), cfg.model.freeze)
    if kind == "pretrain":
        objective = PretrainObjective(model, visual_target=cfg.data.visual_target, img_weight=cfg.train.img_weight)
        lr_scale = lr_rule(settings.lr, None, cfg.optim.bert_lr_scale)
    else:
        from .data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.data.vocab or None)
        families = {t.name: build_family(t, tokenizer) for t in job.tasks}
        objective = TaskObjective(model, families)
        lr_scale = lr_rule(settings.lr, cfg.tasks.head_lr, cfg.optim.bert_lr_scale)
    checkpoints = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.train.keep_last, rank=env.rank,
                                    world_size=env.world_size)
    if job.plan is not None:
        checkpoints.prepare(job.plan)
    engine = build_training_engine(objective, settings, lr_scale=lr_scale, compile=cfg.train.compile,
                                   load_universal=bool(job.plan and job.plan.universal))
    torch.manual_seed(cfg.train.seed + 1 + env.rank)  # dropout differs between ranks
    sizes = read_batch_sizes(engine)
    where = dict(rank=env.rank, world_size=env.world_size, seed=cfg.train.seed)
    evaluation, d = None, cfg.data
    if kind == "pretrain":
        from .data.cc_batches import build_pretrain_loader

        micro = {PRETRAIN_STREAM: sizes.micro}
        factory = loader_factory or build_pretrain_loader
        streams = {PRETRAIN_STREAM: factory(d, split="train", micro_batch_size=sizes.micro,
                                            local_world_size=env.local_world_size, **where)}
        flops = {PRETRAIN_STREAM: vilbert_flops(model.config, text_len=d.max_seq_length, regions=d.max_regions + 1,
                                                masked_tokens=d.mask_prob * (d.max_seq_length - 2),
                                                masked_regions=d.mask_prob * d.max_regions).train}
        sampler_cfg = SamplerConfig(loss_scale="none", stop_and_go=StopAndGoConfig(enabled=False))
        lrs = {PRETRAIN_STREAM: settings.lr}
    else:
        from .tasks.loader import EvalLoader, Evaluation, build_task_loader

        micro = job.micro
        streams = {t.name: build_task_loader(families[t.name], t.splits.train, d, micro_batch_size=micro[t.name], **where)
                   for t in job.tasks}
        flops = {t.name: vilbert_flops(model.config, text_len=t.max_seq_length, regions=t.max_region_num, heads=(),
                                       task_token=True).train for t in job.tasks}
        if cfg.tasks.evaluate or cfg.tasks.final_eval:
            eval_micro = {t.name: max(1, cfg.tasks.eval_batch_size.get(t.name, t.eval_batch_size) // env.world_size)
                          for t in job.tasks}
            evaluation = Evaluation(families, {t.name: EvalLoader(families[t.name], t.splits.val, d, rank=env.rank,
                                                                  world_size=env.world_size, num_workers=0,
                                                                  micro_batch_size=eval_micro[t.name])
                                               for t in job.tasks}, engine.device, engine_float_dtype(engine))
        sampler_cfg, lrs = cfg.tasks.sampler, {t.name: t.lr for t in job.tasks}
    longest = max(len(loader) for loader in streams.values())
    iters_per_epoch = (cfg.tasks.iters_per_epoch if cfg.tasks else None) or max(1, longest // sizes.accumulation)
    total = cfg.train.total_steps or max(1, cfg.train.epochs * longest // sizes.accumulation)
    o = cfg.optim
    schedule = LRSchedule(engine.optimizer, total, warmup_steps_for(total, o.warmup_fraction), kind=o.schedule,
                          iters_per_epoch=iters_per_epoch, decay_epochs=o.decay_epochs, decay_factor=o.decay_factor)
    sampler = build_sampler(list(streams), {n: getattr(s, "epoch_total", len(s)) for n, s in streams.items()}, lrs,
                            sampler_cfg)
    meta = {"kind": kind, "zero_stage": settings.zero_stage, "precision": settings.precision, "module_prefix": "model.",
            "model_config": model.config.to_dict(), "total_steps": total, "batch_sizes": sizes.as_dict(),
            "freeze": cfg.model.freeze}
    if kind != "pretrain":
        meta["tasks"] = list(streams)
    if env.is_main:
        _write_run_files(run_dir, cfg, settings, model)
        if kind != "pretrain":  # what the answer heads will mean (copied by vilbert-ds export)
            write_run_label_maps(run_dir, families, cfg.model.init_from)
        logger = MetricsLogger.for_run(run_dir, cfg.metrics, run_name=run_dir.name, config=cfg.to_dict())
    else:
        logger = MetricsLogger.null()
    tasks = cfg.tasks
    options = TrainerOptions(
        total_steps=total, stop_at_step=cfg.train.stop_at_step, save_every=cfg.train.save_every,
        log_every=cfg.metrics.log_every, check_stop_every=cfg.train.check_stop_every, iters_per_epoch=iters_per_epoch,
        stream_keys=kind != "pretrain", evaluate=bool(tasks and tasks.evaluate),
        eval_max_batches=tasks.eval_max_batches if tasks else None, log_samples=cfg.train.log_samples,
        progress_bar=cfg.metrics.progress_bar, flops_per_sample=flops,
        peak_tflops=peak_tflops(settings.precision, cfg.metrics.peak_tflops), meta=meta)
    trainer = Trainer(engine=engine, streams=streams, sampler=sampler, schedule=schedule, checkpoints=checkpoints,
                      logger=logger, stop=stop, options=options, micro_batches=micro, accumulation=sizes.accumulation,
                      evaluation=evaluation, rank=env.rank, world_size=env.world_size,
                      restart_count=env.restart_count, run_dir=run_dir, float_dtype=engine_float_dtype(engine),
                      zero_stage=settings.zero_stage)
    if job.plan is not None:
        trainer.resume(job.plan)
    # a step is one optimizer update in pretraining, one iteration over the sampled tasks otherwise
    unit = "updates" if kind == "pretrain" else "iterations"
    log.info("%s: %s on %d ranks (%s), micro-batches %s x %d accumulation, %d %s (%d done), %d per epoch, "
             "sampler %s, ZeRO-%d %s, restart %d", kind, list(streams), env.world_size, env.launcher, micro,
             sizes.accumulation, total, unit, trainer.state.step, iters_per_epoch, sampler.kind, settings.zero_stage,
             settings.precision, env.restart_count)
    log.info("optimizer: %s; Adam betas %s, eps %g, weight decay %g (none on bias/LayerNorm), bias correction %s, "
             "gradient clipping %s; schedule %s, warmup %d of %d iterations", job.lr_note or f"lr {settings.lr:g}",
             settings.betas, settings.eps, settings.weight_decay, "on" if settings.bias_correction else "off",
             settings.gradient_clipping or "off", schedule.kind, schedule.warmup_steps, total)
    try:
        status = trainer.fit()
        if status == EXIT_DONE and trainer.state.step >= total and tasks and tasks.final_eval:
            results = trainer.final_eval(run_dir / "eval")
            if env.is_main:
                print("final validation: " + ", ".join(f"{t} {r['score']:.4f}" for t, r in results.items()), flush=True)
    finally:
        logger.close()
        stop.restore()
    if status == EXIT_PREEMPTED:
        status = finish_stop(env, stop)  # requeues the job under SLURM (rank 0); EXIT_STOPPED == 75
    else:
        shutdown_distributed()  # all ranks leave together: barrier + destroy_process_group
    if env.is_main:
        what = "stopped by signal" if status == EXIT_PREEMPTED else "done"
        updates = f", updates {trainer.state.updates}" if kind != "pretrain" else ""
        print(f"{kind} {what}: step {trainer.state.step}/{total}, {trainer.state.samples_seen} samples{updates}, "
              f"run directory {run_dir}", flush=True)
    return status


def _write_run_files(run_dir: Path, cfg: TrainConfig, settings, model: ViLBert) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(run_dir / "config.yaml")
    (run_dir / "ds_config.json").write_text(json.dumps(redact(settings.config), indent=2) + "\n", encoding="utf-8")
    model.config.to_json(run_dir / "model_config.json")


def setup_logging(env: DistEnv, run_dir: Path | None = None) -> None:
    fmt = f"%(asctime)s [rank{env.rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING, format=fmt, stream=sys.stderr,
                        force=True)
    if run_dir is not None and env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter(fmt))
        logging.getLogger().addHandler(handler)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ======================================================================== command line
def add_arguments(parser: argparse.ArgumentParser, kind: str = "pretrain") -> None:
    if kind == "multitask":
        parser.add_argument("--tasks", default=None, help="vqa,gqa,... or the original 1-2-15 (default: tasks.names)")
    if kind == "finetune":
        parser.add_argument("--task", required=True, help="the task (name, title or id)")
        parser.add_argument("--from", dest="init_from", required=True, metavar="CKPT",
                            help="model directory, original checkpoint, or run / checkpoint directory to start from")
    presets = {"pretrain": "pretrain_cc, demo", "multitask": "multitask_12in1", "finetune": "multitask_12in1"}[kind]
    built_in = "" if kind == "pretrain" else f" (default: the built-in {kind} defaults, vilbert_ds/config.py)"
    parser.add_argument("--config", required=kind == "pretrain", default=None,
                        help=f"training YAML or a packaged preset ({presets}){built_in}")
    parser.add_argument("--deepspeed", required=True, metavar="JSON", help="DeepSpeed config, e.g. ds_configs/zero2.json")
    parser.add_argument("--resume", default="none",
                        help="none (fresh; refused if the run has checkpoints) | auto (newest complete checkpoint) | PATH")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides (YAML values), anywhere on the line; ds.<key>=<value> overrides the "
                             "DeepSpeed config")


def main(args: argparse.Namespace, kind: str = "pretrain", loader_factory=None) -> int:
    env = DistEnv.from_env()
    try:
        job = prepare(args, kind, env)
    except (ValueError, KeyError, FileNotFoundError, NotImplementedError) as e:  # ConfigError, DeepSpeedConfigError, CheckpointError
        print(f"vilbert-ds {kind} [rank {env.rank}]: refused: {e}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    setup_logging(env, job.run_dir)
    return run(job, env, loader_factory=loader_factory)


def cli(argv: list[str] | None = None, kind: str = "pretrain") -> int:
    """`python -m vilbert_ds.<kind> ...`: parsed as `vilbert-ds <kind> ...` is (overrides anywhere)."""
    from .cli import run

    return run(kind, sys.argv[1:] if argv is None else list(argv), prog=f"python -m vilbert_ds.{kind}")


def preset(kind: str):
    """(add_arguments, main, cli) of one kind: what `vilbert_ds.pretrain|multitask|finetune` export."""
    return (functools.partial(add_arguments, kind=kind), functools.partial(main, kind=kind),
            functools.partial(cli, kind=kind))


if __name__ == "__main__":
    sys.exit(cli())
