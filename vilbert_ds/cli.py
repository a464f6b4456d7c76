"""`vilbert-ds` command line: one subcommand per module, imported only when used.

Each subcommand module exposes `add_arguments(parser)` and `main(args) -> int`. The table below
is the whole registry: adding a subcommand is one line here plus its module. `run(name, argv)`
is the one way a command line becomes a call (`python -m vilbert_ds.pretrain|...|evaluate` go
through it too), so every command gets the same help format and override parsing.
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
# commands whose `section.key=value` overrides may stand anywhere on the line, before or after options
TAKES_OVERRIDES = ("pretrain", "multitask", "finetune")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, as with argparse.ArgumentDefaultsHelpFormatter,
    except where that says nothing (None, False, an empty list) or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or default == [] or "default" in text.lower()
                or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with `HelpFormatter`; sub-command parsers inherit both (argparse
    creates them with the class of their parent)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def version() -> str:
    """`vilbert-ds 0.1.0 (torch 2.13.0, deepspeed 0.x, python 3.11.7)`: what a bug report needs."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from . import __version__

    parts = []
    for dist in ("torch", "deepspeed"):
        try:
            parts.append(f"{dist} {installed(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} not installed")
    parts.append(f"python {sys.version.split()[0]}")
    return f"vilbert-ds {__version__} ({', '.join(parts)})"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="vilbert-ds", description=__doc__.splitlines()[0],
                            epilog="`vilbert-ds COMMAND --help` describes a command's arguments and their defaults.")
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_parser(name: str, prog: str | None = None) -> ArgumentParser:
    """The parser of one command, with its module's arguments."""
    module = importlib.import_module(COMMANDS[name][0])
    parser = ArgumentParser(prog=prog or f"vilbert-ds {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    return parser


def parse(name: str, argv: list[str], prog: str | None = None) -> argparse.Namespace:
    parser = command_parser(name, prog)
    if name in TAKES_OVERRIDES:  # `vilbert-ds pretrain train.total_steps=10 --config c.yaml ...` too
        return parser.parse_intermixed_args(argv)
    return parser.parse_args(argv)


def run(name: str, argv: list[str], prog: str | None = None) -> int:
    """Parse `argv` for command `name` and run it; its exit status."""
    args = parse(name, argv, prog)
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(args) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        build_parser().print_help()
        return 2
    name = argv[0]
    if name.startswith("-"):  # --help, --version, or an option the top level does not have
        build_parser().parse_args(argv)  # prints and exits (0 for help/version, 2 for anything else)
        return 2
    if name not in COMMANDS:
        build_parser().print_help(sys.stderr)
        print(f"\nvilbert-ds: unknown command {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run(name, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
