"""The launch and sbatch scripts parse, document their variables, and the single-node launcher
starts the entry point through the deepspeed launcher."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("slurm/*.sh"), *REPO.glob("slurm/*.sbatch")])


def test_every_script_parses_and_documents_itself():
    assert len(SCRIPTS) >= 7
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
        head = script.read_text().split("set -euo pipefail")[0]
        assert head.count("\n#") >= 5, f"{script.name}: no documentation header"
        assert "/home/" not in script.read_text() and "/scratch" not in script.read_text(), "site-specific path"
        assert os.access(script, os.X_OK)


def test_sbatch_scripts_are_preemption_ready():
    for name in ("train",):
        text = (REPO / "slurm" / f"{name}.sbatch").read_text()
        for directive in ("#SBATCH --signal=USR1@", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
            assert directive in text, f"{name}.sbatch lacks {directive}"
        assert "exec srun --kill-on-bad-exit=1" in text and "--resume auto" in text
        body = text.split("set -euo pipefail")[1]
        assert not re.search(r"(?<!-)\bdeepspeed\s", body), "ranks start with srun, not the deepspeed launcher"


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_single_node_script_starts_the_entry_point(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", NUM_GPUS="1", MASTER_PORT="0", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", str(REPO / "launch" / "single_node.sh"), "--help"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "python -m vilbert_ds.pretrain" in out.stdout or "vilbert_ds.pretrain" in out.stdout
    assert "--resume" in out.stdout and "section.key=value" in out.stdout
