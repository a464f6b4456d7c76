"""`vilbert-ds` command line: one subcommand per module, imported only when used.

Each subcommand module exposes `add_arguments(parser)` and `main(args) -> int`. The table below
is the whole registry: adding a subcommand is one line here plus its module.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("vilbert_ds.commands.info", "describe a model config or checkpoint (parameter counts, heads)"),
    "convert": ("vilbert_ds.commands.convert", "convert original ViLBERT checkpoints to vilbert-ds and back"),
    "shards": ("vilbert_ds.commands.shards", "build, verify and inspect WebDataset feature shards"),
    # the three presets of the one training path (vilbert_ds/train.py)
    "pretrain": ("vilbert_ds.pretrain", "pretrain ViLBERT on Conceptual Captions shards with DeepSpeed"),
    "multitask": ("vilbert_ds.multitask", "12-in-1 multi-task training with task sampling"),
    "finetune": ("vilbert_ds.finetune", "fine-tune one task from a checkpoint"),
    "eval": ("vilbert_ds.evaluate", "evaluate a checkpoint on a task with its standard metric"),
    "predict": ("vilbert_ds.commands.predict", "ask a model about your input: answers, classes, boxes, rankings, embeddings"),
    "export": ("vilbert_ds.commands.export", "export a DeepSpeed checkpoint to consolidated fp32 safetensors"),
    "plot": ("vilbert_ds.commands.plot", "plot the metrics of a run to PNG"),
    "demo": ("vilbert_ds.commands.demo", "the embedded default: synthetic shards -> pretrain -> resume -> multi-task -> eval"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vilbert-ds", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        build_parser().print_help(sys.stderr)
        print(f"\nvilbert-ds: unknown command {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"vilbert-ds {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
