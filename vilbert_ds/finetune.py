"""Fine-tune one task from a checkpoint: `vilbert-ds finetune --task vqa --from <ckpt> --deepspeed ds.json`.

The 12-in-1 recipe (the original ran `train_tasks.py --tasks N` from `multi_task_model.bin`):
the multi-task trainer with a single task. `--from` takes a vilbert-ds model directory (e.g. a
converted original checkpoint) or a run / checkpoint directory of `vilbert-ds multitask` or
`pretrain` (exported once to fp32). Heads and task tokens the checkpoint lacks start random.
Stop-and-go is off by default here: with one task it would only skip updates
(`tasks.sampler.stop_and_go.enabled=true` restores the original's behaviour).
"""
from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError
from .config import ConfigError
from .distributed import DistEnv
from .engine import DeepSpeedConfigError
from .multitask import EXIT_REFUSED, prepare, run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="the task (name, title or id)")
    parser.add_argument("--from", dest="init_from", required=True, metavar="CKPT",
                        help="model directory, or run / checkpoint directory to start from")
    parser.add_argument("--config", default=None, help="YAML with the multitask sections (default: built-in defaults)")
    parser.add_argument("--deepspeed", required=True, metavar="JSON", help="DeepSpeed config (gradient_accumulation_steps 1)")
    parser.add_argument("--resume", default="none", help="none | auto | PATH")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides; ds.<key>=<value>")


def main(args: argparse.Namespace) -> int:
    env = DistEnv.from_env()
    args.tasks = args.task
    defaults = ["tasks.sampler.stop_and_go.enabled=false", f"train.output_dir=runs/finetune-{args.task}"]
    try:
        if "," in args.task:
            raise ConfigError(f"finetune trains one task; got {args.task!r} (use vilbert-ds multitask for several)")
        cfg, settings = prepare(args, env, command="finetune", defaults=defaults,
                                extra=[f"model.init_from={args.init_from}"])
    except (ConfigError, DeepSpeedConfigError, CheckpointError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"vilbert-ds finetune [rank {env.rank}]: refused: {e}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    return run(cfg, settings, env, cli_tasks=args.task, resume=args.resume)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vilbert_ds.finetune", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
