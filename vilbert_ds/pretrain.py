"""Conceptual Captions pretraining: `vilbert-ds pretrain --config run.yaml --deepspeed ds.json`.

Also runs as `deepspeed -m vilbert_ds.pretrain ...`, `torchrun -m vilbert_ds.pretrain ...` and
`srun python -m vilbert_ds.pretrain ...` (rank discovery: `vilbert_ds.distributed.DistEnv`).
Everything that can be refused (training config, DeepSpeed config, resume combination) is
checked before the process group starts. Exit status 0 = done (or `train.stop_at_step`
reached), 75 = stopped by a signal after a complete checkpoint (resume with `--resume auto`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import CheckpointError, CheckpointManager, plan_resume
from .config import ConfigError, ModelSection, TrainConfig, split_overrides
from .data.batch import PretrainBatch
from .data.config import redact
from .distributed import DistEnv, init_distributed, shutdown_distributed
from .engine import (DeepSpeedConfigError, build_engine, enable_activation_checkpointing, engine_float_dtype, load_ds_config,
                     param_groups, read_batch_sizes, text_stream_scale, validate_ds_config, warmup_steps_for,
                     WarmupLinearSchedule)
from .metrics import MetricsLogger, peak_tflops, vilbert_flops
from .model import ViLBert, ViLBertConfig, resolve_config
from .trainer import EXIT_PREEMPTED, Ratio, Trainer, TrainerOptions

log = logging.getLogger("vilbert_ds.pretrain")

PRETRAIN_HEADS = ("seq_relationship",)  # MLM / region heads run on masked positions only, inside the losses


class PretrainObjective(nn.Module):
    """ViLBERT + its three pretraining losses: `forward(batch) -> (loss, metrics)`.

    loss = masked_lm + img_weight * masked_region + alignment (the original's sum).
    """

    def __init__(self, model: ViLBert, *, visual_target: int = 0, img_weight: float = 1.0):
        super().__init__()
        self.model = model
        self.visual_target = visual_target
        self.img_weight = img_weight

    def forward(self, batch: PretrainBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self.model(**batch.model_inputs(), heads=PRETRAIN_HEADS, visual_target=self.visual_target,
                         img_weight=self.img_weight)
        metrics: dict[str, Any] = {
            "masked_lm_loss": out.masked_lm_loss,
            "masked_img_loss": out.masked_img_loss,
            "alignment_loss": out.next_sentence_loss,
        }
        if batch.is_next is not None:
            with torch.no_grad():
                picked = batch.is_next != -1
                correct = (out.seq_relationship.argmax(-1) == batch.is_next) & picked
                metrics["alignment_acc"] = Ratio(correct.sum(), picked.sum())
        return out.loss, metrics


def model_config(section: ModelSection) -> ViLBertConfig:
    """The config `build_model` builds, read without building anything (a resume compares it with
    the checkpoint's before any process group starts)."""
    from .weights import config_from_hf_bert

    overrides = {"with_task_heads": section.task_heads, **section.overrides}
    if section.init_from:
        return resolve_config(section.init_from, **overrides)
    if section.init_text_from:
        return config_from_hf_bert(_text_init_path(section.init_text_from), base=resolve_config(section.config),
                                   **overrides)
    return resolve_config(section.config, **overrides)


def build_model(section: ModelSection) -> ViLBert:
    """The ViLBERT to pretrain, initialised as configured (text stream from a local BERT like the
    original's bert-base-uncased, or every weight from a vilbert-ds model directory)."""
    from .weights import load_hf_bert, load_model

    overrides = {"with_task_heads": section.task_heads, **section.overrides}
    if section.init_from:
        return load_model(section.init_from, **overrides)
    if section.init_text_from:
        path = _text_init_path(section.init_text_from)
        model = ViLBert(model_config(section))
        report = load_hf_bert(model, path)
        log.info("text stream initialised from %s (%d tensors kept their init)", path, len(report.missing))
        return model
    return ViLBert(resolve_config(section.config, **overrides))


def _text_init_path(spec: str) -> Path:
    if spec == "minilm":
        from .assets import minilm_dir

        return minilm_dir()
    return Path(spec)


def setup_logging(env: DistEnv, run_dir: Path | None = None) -> None:
    fmt = f"%(asctime)s [rank{env.rank}] %(levelname)s %(name)s: %(message)s"
    level = logging.INFO if env.is_main else logging.WARNING
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    if run_dir is not None and env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter(fmt))
        logging.getLogger().addHandler(handler)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


LoaderFactory = Callable[..., Any]


def _default_loader_factory(cfg, *, split, rank, world_size, micro_batch_size, seed):
    from .data.cc_batches import build_pretrain_loader

    return build_pretrain_loader(cfg, split=split, rank=rank, world_size=world_size,
                                 micro_batch_size=micro_batch_size, seed=seed)


def run(cfg: TrainConfig, settings, env: DistEnv, resume: str = "none",
        loader_factory: LoaderFactory | None = None) -> int:
    """Build everything and train. Assumes validated configs; starts the process group."""
    run_dir = Path(cfg.train.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    plan = plan_resume(resume, ckpt_dir, world_size=env.world_size, zero_stage=settings.zero_stage,
                       precision=settings.precision)
    init_distributed(env, init_timeout_s=cfg.train.init_timeout_s, timeout_s=cfg.train.timeout_s)
    from .preemption import StopSignal, finish_stop

    stop = StopSignal(check_every=cfg.train.check_stop_every)  # armed before the slow part
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    if cfg.train.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(cfg.model)
    objective = PretrainObjective(model, visual_target=cfg.data.visual_target, img_weight=cfg.train.img_weight)
    if settings.activation_checkpointing:
        enable_activation_checkpointing(model, settings)
    groups = param_groups(model, lr=settings.lr, weight_decay=settings.weight_decay,
                          lr_scale=text_stream_scale(cfg.optim.bert_lr_scale))
    checkpoints = CheckpointManager(ckpt_dir, keep_last=cfg.train.keep_last, rank=env.rank,
                                    world_size=env.world_size)
    if plan is not None:
        checkpoints.prepare(plan)
    engine = build_engine(objective, settings, groups, load_universal=bool(plan and plan.universal))
    if cfg.train.compile:
        engine.compile()
    torch.manual_seed(cfg.train.seed + 1 + env.rank)  # dropout differs between ranks
    batch_sizes = read_batch_sizes(engine)
    factory = loader_factory or _default_loader_factory
    loader = factory(cfg.data, split="train", rank=env.rank, world_size=env.world_size,
                     micro_batch_size=batch_sizes.micro, seed=cfg.train.seed)
    total_steps = cfg.train.total_steps or max(1, cfg.train.epochs * len(loader) // batch_sizes.accumulation)
    schedule = WarmupLinearSchedule(engine.optimizer, total_steps, warmup_steps_for(total_steps, cfg.optim.warmup_fraction))
    d = cfg.data
    flops = vilbert_flops(model.config, text_len=d.max_seq_length, regions=d.max_regions + 1,
                          masked_tokens=d.mask_prob * (d.max_seq_length - 2), masked_regions=d.mask_prob * d.max_regions)
    meta = {"zero_stage": settings.zero_stage, "precision": settings.precision, "module_prefix": "model.",
            "model_config": model.config.to_dict(), "total_steps": total_steps}
    if env.is_main:
        _write_run_files(run_dir, cfg, settings, model)
        logger = MetricsLogger.for_run(run_dir, cfg.metrics, run_name=run_dir.name, config=cfg.to_dict())
    else:
        logger = MetricsLogger.null()
    options = TrainerOptions(
        total_steps=total_steps, stop_at_step=cfg.train.stop_at_step, save_every=cfg.train.save_every,
        log_every=cfg.metrics.log_every, check_stop_every=cfg.train.check_stop_every,
        log_samples=cfg.train.log_samples, progress_bar=cfg.metrics.progress_bar, flops_per_sample=flops.train,
        peak_tflops=peak_tflops(settings.precision, cfg.metrics.peak_tflops), meta=meta,
    )
    trainer = Trainer(engine=engine, loader=loader, schedule=schedule, batch_sizes=batch_sizes,
                      checkpoints=checkpoints, logger=logger, stop=stop, options=options, rank=env.rank,
                      world_size=env.world_size, restart_count=env.restart_count, run_dir=run_dir,
                      float_dtype=engine_float_dtype(engine), zero_stage=settings.zero_stage)
    if plan is not None:
        trainer.resume(plan)
    log.info("pretraining: %d ranks (%s), batch %s, %d updates (%d done), ZeRO-%d %s, restart %d",
             env.world_size, env.launcher, batch_sizes.as_dict(), total_steps, trainer.state.step,
             settings.zero_stage, settings.precision, env.restart_count)
    try:
        status = trainer.fit()
    finally:
        logger.close()
        stop.restore()
    if status == EXIT_PREEMPTED:
        status = finish_stop(env, stop)  # requeues the job under SLURM (rank 0); EXIT_STOPPED == 75
    else:
        shutdown_distributed()  # all ranks leave together: barrier + destroy_process_group
    if env.is_main:
        _print_summary(run_dir, trainer, status)
    return status


def _write_run_files(run_dir: Path, cfg: TrainConfig, settings, model: ViLBert) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(run_dir / "config.yaml")
    (run_dir / "ds_config.json").write_text(json.dumps(redact(settings.config), indent=2) + "\n", encoding="utf-8")
    model.config.to_json(run_dir / "model_config.json")


def _print_summary(run_dir: Path, trainer: Trainer, status: int) -> None:
    state = trainer.state
    what = "stopped by signal" if status == EXIT_PREEMPTED else "done"
    print(f"pretrain {what}: step {state.step}, {state.samples_seen} samples, run directory {run_dir}", flush=True)


# ======================================================================== command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training YAML (or a packaged preset: pretrain_cc, demo)")
    parser.add_argument("--deepspeed", required=True, metavar="JSON", help="DeepSpeed config, e.g. ds_configs/zero2.json")
    parser.add_argument("--resume", default="none",
                        help="none (fresh; refused if the run has checkpoints) | auto (newest complete checkpoint) | PATH")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="training-config overrides; ds.<key>=<value> overrides the DeepSpeed config")


EXIT_REFUSED = 2  # a config or resume combination refused before any work started


def main(args: argparse.Namespace, loader_factory: LoaderFactory | None = None) -> int:
    env = DistEnv.from_env()
    try:
        train_overrides, ds_overrides = split_overrides(args.overrides)
        cfg = TrainConfig.load(args.config, train_overrides)
        settings = validate_ds_config(load_ds_config(args.deepspeed, ds_overrides), source=args.deepspeed,
                                      world_size=env.world_size)
        plan_resume(args.resume, Path(cfg.train.output_dir) / "checkpoints", world_size=env.world_size,
                    zero_stage=settings.zero_stage, precision=settings.precision,
                    model_config=model_config(cfg.model).to_dict() if args.resume != "none" else None)
    except (ConfigError, DeepSpeedConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"vilbert-ds pretrain [rank {env.rank}]: refused: {e}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    setup_logging(env, Path(cfg.train.output_dir))
    return run(cfg, settings, env, resume=args.resume, loader_factory=loader_factory)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vilbert_ds.pretrain", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
