"""Command-line conventions of `vilbert-ds`: --version, help that shows defaults, no advertised
command or option that does not exist, overrides anywhere on the line, and `vilbert-ds eval`
under the deepspeed launcher with its progress bar (rank 0, stderr, only on a terminal).
(`export --force`: tests/test_train_distributed.py, which has a checkpoint to export.)"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vilbert_ds.cli import COMMANDS, TAKES_OVERRIDES, command_parser, main, parse

REPO = Path(__file__).resolve().parents[1]


def _parsers():
    """(name, parser) of every command and every `shards` action."""
    for name in COMMANDS:
        parser = command_parser(name)
        yield name, parser
        for action in parser._actions:  # noqa: SLF001 - argparse keeps sub-parsers only here
            if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
                for sub, subparser in action.choices.items():
                    yield f"{name} {sub}", subparser


def test_version_from_the_installed_script():
    script = shutil.which("vilbert-ds")
    cmd = [script] if script else [sys.executable, "-m", "vilbert_ds.cli"]
    out = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
    from vilbert_ds import __version__

    assert out.returncode == 0, out.stderr[-2000:]
    assert re.fullmatch(rf"vilbert-ds {re.escape(__version__)} \(torch \S+, deepspeed \S+, python \S+\)\n", out.stdout)
    setup = (REPO / "setup.py").read_text()
    assert f'version="{__version__}"' in setup, "setup.py and vilbert_ds.__version__ disagree"


def test_help_of_every_command_shows_the_defaults():
    """Every option with a default worth showing says it in its help (not None/False/empty)."""
    missing = []
    for name, parser in _parsers():
        text = parser.format_help()
        for action in parser._actions:  # noqa: SLF001
            if (not action.option_strings or action.help == argparse.SUPPRESS or action.default is None
                    or action.default is False or action.default == argparse.SUPPRESS or action.default == []):
                continue
            first = action.option_strings[-1]
            block = re.search(rf"^  (?:-\w, )?{re.escape(action.option_strings[0])}\b.*?(?=^  -|\Z)", text, re.M | re.S)
            if block is None or "default" not in block.group(0):
                missing.append(f"vilbert-ds {name} {first} (default {action.default!r})")
    assert not missing, "help without the default: " + ", ".join(missing)


def test_top_level_help_lists_exactly_the_commands_that_exist(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    listed = re.findall(r"^    (\w+)", capsys.readouterr().out, re.M)
    assert listed == list(COMMANDS)
    for name, (module, _) in COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.main), name
    assert main(["nosuch"]) == 2
    assert "unknown command 'nosuch'" in capsys.readouterr().err


def _docstring_commands() -> list[tuple[str, str]]:
    """(module, command) for each `vilbert-ds ...` usage line of the command modules' docstrings."""
    out = []
    for name, (module, _) in COMMANDS.items():
        doc = importlib.import_module(module).__doc__ or ""
        for m in re.finditer(r"^\s*`?vilbert-ds (\w+ .*?)`?$", doc, re.M):
            line = m.group(1).split("`")[0]
            out.append((module, line))
    return out


def test_usage_lines_in_the_command_docstrings_parse():
    """What a module's docstring advertises (`vilbert-ds shards inspect OUT/manifest.json --index 0`,
    `... [--task-heads]`) is accepted by the command's parser."""
    lines = _docstring_commands()
    assert len(lines) >= 8
    for module, line in lines:
        words = shlex.split(re.sub(r"\[(-[^\]]*)\]", r"\1", line), comments=True)  # [--out PNG]: optional
        if words[-1] == "..." and all(re.fullmatch(r"[a-z]+", w) for w in words[:-1]):
            continue  # `vilbert-ds shards ...`: the command named, not a command line
        try:
            parse(words[0], words[1:])
        except SystemExit:
            pytest.fail(f"{module} docstring: `vilbert-ds {line}` does not parse", pytrace=False)


@pytest.mark.parametrize("kind", TAKES_OVERRIDES)
def test_overrides_are_accepted_anywhere_on_the_line(kind, tmp_path, capsys):
    extra = {"pretrain": [], "multitask": ["--tasks", "vqa"], "finetune": ["--task", "vqa", "--from", "m"]}[kind]
    options = ["--config", str(tmp_path / "missing.yaml"), "--deepspeed", "ds.json", *extra]
    at_end = parse(kind, [*options, "train.total_steps=3", "ds.zero_optimization.stage=2"])
    spread = parse(kind, ["train.total_steps=3", *options[:2], "ds.zero_optimization.stage=2", *options[2:],
                          "--local_rank=0"])
    assert spread.overrides == at_end.overrides == ["train.total_steps=3", "ds.zero_optimization.stage=2"]
    assert vars(spread) == {**vars(at_end), "local_rank": 0}
    # the whole command, and `python -m vilbert_ds.<kind>` (the same parser): parsed, then refused
    # for the missing config file in one line, exit 2
    module = importlib.import_module(f"vilbert_ds.{kind}")
    for run in (lambda argv: main([kind, *argv]), module.cli):
        assert run(["train.total_steps=3", *options]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "missing.yaml: no such file" in err[0], err


# ============================================================ eval under the deepspeed launcher
@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory):
    """A VQA task set (8 images per split) and an untrained tiny model with task heads."""
    import torch

    from fixtures.tasks import build_synthetic_tasks
    from vilbert_ds import get_model, save_model

    root = tmp_path_factory.mktemp("eval_cli")
    registry = build_synthetic_tasks(root / "tasks", tasks=("vqa",), images=8, questions=2)
    torch.manual_seed(0)
    save_model(get_model(config="tiny"), root / "model")  # with the task heads and task tokens
    return root, registry


def _on_a_terminal(cmd: list[str], env: dict, cwd: Path, timeout: float) -> tuple[int, str]:
    """Run `cmd` with stderr on a pseudo-terminal (120 columns); (exit status, stderr)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        status = proc.wait(timeout=timeout)
    finally:
        os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    return status, b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_eval_under_the_deepspeed_launcher_with_a_progress_bar_on_rank_0(eval_inputs, tmp_path, capfd):
    """2 ranks through `deepspeed --module vilbert_ds.evaluate` (which passes --local_rank=N): the
    same metrics as one process; with stderr on a terminal rank 0 shows a bar and rank 1 none; in
    a pipe (the in-process run) no bar at all."""
    from fixtures.training import launch_cmd, train_env

    root, registry = eval_inputs
    args = ["--task", "vqa", "--ckpt", str(root / "model"), "--registry", str(registry), "--workers", "0",
            "--batch-size", "2"]
    capfd.readouterr()
    assert main(["eval", *args, "--out", str(tmp_path / "one")]) == 0
    assert "eval vqa minval" not in capfd.readouterr().err  # not a terminal: no bar
    status, err = _on_a_terminal(launch_cmd(2, ["-m", "vilbert_ds.evaluate"], [*args, "--out", str(tmp_path / "two")]),
                                 train_env(), REPO, timeout=240)
    assert status == 0, err[-4000:]
    assert len(re.findall(r"eval vqa minval:\s+0%", err)) == 1, err[-3000:]  # one bar: rank 0's
    assert re.search(r"eval vqa minval: 100%\|.*\| 2/2 ", err), err[-3000:]  # 8 examples / 2 ranks / batch 2
    one = json.loads((tmp_path / "one" / "vqa_minval_metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "vqa_minval_metrics.json").read_text())
    assert two["count"] == one["count"] == 8 and two["score"] == pytest.approx(one["score"], abs=1e-6)
    assert json.loads((tmp_path / "two" / "vqa_minval_predictions.json").read_text()) == \
        json.loads((tmp_path / "one" / "vqa_minval_predictions.json").read_text())
