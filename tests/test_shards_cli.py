"""CLI conventions of `vilbert-ds shards`: `inspect` prints one sample; progress bars appear on a
terminal (stderr), never with --quiet or off a terminal, and the build bar moves per sample."""
from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import sys
import termios
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vilbert_ds.cli import main as cli

pytestmark = pytest.mark.timeout(120)


def test_inspect_prints_members_shapes_dtypes_and_caption(synthetic_shards, capsys):
    m = json.loads(synthetic_shards.manifest.read_text())
    stats = json.loads((synthetic_shards.out / "cc-000001.stats.json").read_text())
    key = stats["keys"][2]  # sample 12 + 2 of the set
    assert cli(["shards", "inspect", str(synthetic_shards.manifest), "--index", "14"]) == 0
    by_index = capsys.readouterr().out.splitlines()
    assert cli(["shards", "inspect", str(synthetic_shards.out), "--key", key]) == 0  # a directory works too
    by_key = capsys.readouterr().out.splitlines()
    assert by_index == by_key
    start, end = m["shards"][1]["offsets"][2:4]
    assert by_index[0] == f"sample 14 of 48: key {key}, {synthetic_shards.out}/cc-000001.tar #2 (bytes {start}-{end})"
    members = {line.split()[0]: line for line in by_index[1:-1]}
    assert list(members) == [f"{key}.json", f"{key}.features.npy", f"{key}.boxes.npy", f"{key}.cls_prob.npy"]
    assert re.search(r"float16\[10, 2048\]\s+min [\d.e+-]+\s+max [\d.e+-]+\s+mean", members[f"{key}.features.npy"])
    assert "float32[10, 4]" in members[f"{key}.boxes.npy"] and "float16[10, 1601]" in members[f"{key}.cls_prob.npy"]
    meta = json.loads(members[f"{key}.json"].split(" B  ", 1)[1])
    assert meta["num_boxes"] == 10 and by_index[-1] == f"caption: {meta['caption']}"
    pool = json.loads((synthetic_shards.out / "captions.json").read_text())
    assert meta["caption"] in pool


@pytest.mark.parametrize("args,line", [
    (["--index", "48"], r"--index 48: the set has 48 samples \(0\.\.47\)"),
    (["--key", "nope"], r"--key 'nope': no such sample in 4 shard\(s\)"),
])
def test_inspect_refuses_a_sample_that_is_not_there(synthetic_shards, capsys, args, line):
    assert cli(["shards", "inspect", str(synthetic_shards.manifest), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(line, err[0]), err


# ------------------------------------------------------------------------------ progress bars
class Terminal:
    """A pseudo-terminal of 120 columns, as stderr of an interactive shell. `attach()` makes it
    sys.stderr (inside the test body: pytest's capture re-patches sys.stderr after fixtures);
    `read()` returns what was written to it since the last read."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a pty has no size by default
        self.tty = os.fdopen(slave, "w", buffering=1)
        os.set_blocking(self.master, False)

    def attach(self) -> None:
        self.monkeypatch.setattr(sys, "stderr", self.tty)

    def read(self) -> str:
        self.tty.flush()
        chunks = []
        while True:
            try:
                data = os.read(self.master, 65536)
            except (BlockingIOError, OSError):
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks).decode("utf-8", "replace")

    def close(self) -> None:
        self.tty.close()
        os.close(self.master)


@pytest.fixture
def terminal(monkeypatch):
    term = Terminal(monkeypatch)
    yield term
    term.close()


def _build_args(inputs, out: Path, *extra: str) -> list[str]:
    return ["shards", "build", "--format", "tsv", "--input", *inputs["features"], "--captions", inputs["captions_json"],
            "--output", str(out), "--max-count", "10", *extra]


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory):
    from vilbert_ds.data.synthetic import SyntheticSpec, write_tsv

    return write_tsv(str(tmp_path_factory.mktemp("bars")), SyntheticSpec(num_images=30, num_boxes=2, seed=3))


def test_bars_on_a_terminal_and_not_with_quiet(small_inputs, synthetic_shards, terminal, tmp_path, capsys):
    terminal.attach()
    assert cli(_build_args(small_inputs, tmp_path / "a")) == 0
    shown = terminal.read()
    assert "shards shard" in shown and re.search(r"30(\.0)?/30(\.0)? ", shown), shown
    assert cli(["shards", "verify", str(synthetic_shards.manifest)]) == 0
    shown = terminal.read()
    assert "verify" in shown and "4/4" in shown and "shard" in shown, shown
    assert cli(_build_args(small_inputs, tmp_path / "b", "--quiet")) == 0
    assert cli(["shards", "verify", str(synthetic_shards.manifest), "--quiet"]) == 0
    assert cli(_build_args(small_inputs, tmp_path / "c", "--no-progress")) == 0
    assert terminal.read() == ""
    capsys.readouterr()


def test_task_bar_on_a_terminal(tmp_path, terminal):
    from vilbert_ds.tasks.synthetic_qa import make_synthetic_tasks

    make_synthetic_tasks(tmp_path, ["vqa"])
    terminal.attach()
    assert cli(["shards", "task", "--task", "vqa", "--data-root", str(tmp_path), "--splits", "minval"]) == 0
    shown = terminal.read()
    assert "vqa/minval" in shown and "16/16" in shown and "example" in shown, shown


def test_build_bar_moves_per_sample_with_workers(tmp_path, monkeypatch):
    """2 workers; record 25 (inside shard 1) is a pipe that blocks its worker. While it blocks,
    the bar must already count the 5 records of shard 1 before it, not only finished shards."""
    from vilbert_ds.data import writer

    monkeypatch.setattr(writer, "PROGRESS_EVERY_S", 0.0)  # every sample reaches the bar at once
    counted: list[int] = []

    class Recorder:
        def __init__(self, total):
            self.total, self.n = total, 0

        def update(self, n=1):
            self.n += n
            counted.append(self.n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(writer.ShardBuilder, "progress_bar", lambda self, total: Recorder(total))
    src = tmp_path / "npz"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):
        if i == 25:
            os.mkfifo(src / f"{i:03d}.npz")
        else:
            np.savez(src / f"{i:03d}.npz", features=rng.random((2, 8), dtype=np.float32), boxes=np.ones((2, 4), np.float32),
                     image_w=np.int64(10), image_h=np.int64(10))
    out = tmp_path / "out"
    seen_while_blocked = []

    def unblock():
        deadline = time.monotonic() + 60
        while 33 not in counted and time.monotonic() < deadline:  # shards 0 and 2 (28) + records 20..24
            time.sleep(0.01)
        seen_while_blocked.append((max(counted, default=0), (out / "shard-000001.tar").exists()))
        with open(src / "025.npz", "wb"):
            pass  # the blocked reader gets an empty file: a bad record, skipped

    t = threading.Thread(target=unblock, daemon=True)
    t.start()
    rc = cli(["shards", "build", "--format", "npz", "--input", str(src), "--output", str(out), "--missing-caption", "none",
              "--max-count", "20", "--workers", "2", "--feature-dim", "8", "--on-bad-record", "skip", "--quiet"])
    t.join(10)
    assert rc == 0
    assert seen_while_blocked == [(33, False)]  # 33 counted while shard 1 was still being written
    assert counted[-1] == 48 and json.loads((out / "manifest.json").read_text())["num_samples"] == 47
