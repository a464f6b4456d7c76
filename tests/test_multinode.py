"""Multi-node launches for real on one machine, through the repository's launch scripts: a
2-"node" deepspeed hostfile launch over ssh (pdsh runner, sshd on 127.0.0.2/.3) and a 2-node
torchrun (c10d) launch on the same two addresses, both ZeRO-2, agreeing on the loss. The torchrun
job then loses a rank (SIGKILL), and on the next launch freezes one (SIGSTOP): each ends within
a bound with the rank named, and the next launch resumes from the last complete checkpoint."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.slurm import read_metrics
from vilbert_ds.distributed import EXIT_PEER_LOST

pytestmark = [pytest.mark.multinode, pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
WATCHDOG_S = 8  # heartbeat silence that ends the job; the bound below follows from it


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _base_env(inputs) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(CONFIG=str(inputs.config), DS_CONFIG=str(inputs.ds_config), PYTHON=sys.executable,
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", VILBERT_DS_WATCHDOG_S=str(WATCHDOG_S),
               VILBERT_DS_HEARTBEAT_S="0.5")
    return env


def _losses(run_dir: Path) -> dict[int, float]:
    return {step: row["train/loss"] for step, row in read_metrics(run_dir).items()}


def _wait(predicate, timeout_s: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if procs and all(p.poll() is not None for p in procs):
            break
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def hostfile_run(sshd_nodes, launch_inputs, tmp_path_factory):
    """One 2-"node" hostfile launch through launch/multi_node.sh: (exit status, log, run dir)."""
    tmp = tmp_path_factory.mktemp("hostfile")
    hostfile = tmp / "hostfile"
    hostfile.write_text("n1 slots=1\nn2 slots=1\n")
    env = _base_env(launch_inputs)
    env.update(HOSTFILE=str(hostfile), MASTER_ADDR="n1", MASTER_PORT=str(_free_port("127.0.0.2")),
               SSH_PORT=str(sshd_nodes.port), PDSH_SSH_ARGS_APPEND=sshd_nodes.ssh_args,
               LAUNCHER_ARGS="--no_ssh_check", DS_ENV_FILE=str(tmp / ".deepspeed_env"))
    run_dir = tmp / "run"
    out = subprocess.run(["bash", str(REPO / "launch" / "multi_node.sh"), *launch_inputs.overrides(run_dir)],
                         env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    return out.returncode, out.stdout + out.stderr, run_dir


def test_hostfile_launch_over_ssh(hostfile_run):
    status, log, run_dir = hostfile_run
    assert status == 0, log[-5000:]
    # both "nodes" ran a rank (pdsh prefixes remote output with the host), ZeRO-2, 2 ranks
    assert "n1: " in log and "n2: " in log, log[-3000:]
    assert "2 ranks (deepspeed)" in log and "ZeRO-2" in log
    # what had to cross nodes went through .deepspeed_env and the venv script
    env_file = (run_dir.parent / ".deepspeed_env").read_text()
    assert "DS_ACCELERATOR=cpu" in env_file and "TORCH_EXTENSIONS_DIR=" in env_file
    assert "VILBERT_DS_WATCHDOG_S=" in env_file
    assert str(Path(sys.executable).parent) in (run_dir.parent / ".deepspeed_env.venv.sh").read_text()
    assert "Building extension" not in log and "Emitting ninja" not in log  # the nodes reused the built ops
    assert sorted(_losses(run_dir)) == list(range(1, 25))


class TorchrunJob:
    """Two `launch/torchrun.sh` agents, "nodes" n1 (127.0.0.2) and n2 (127.0.0.3)."""

    def __init__(self, inputs, run_dir: Path, logs: Path, attempt: int, port: int):
        self.procs: list[subprocess.Popen] = []
        self.logs = [logs / f"torchrun{attempt}.n{i + 1}.log" for i in range(2)]
        for i, (node, addr) in enumerate((("n1", "127.0.0.2"), ("n2", "127.0.0.3"))):
            env = _base_env(inputs)
            env.update(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.2:{port}", NODE_ADDR=addr,
                       RDZV_ID=f"vds-{attempt}-{port}")
            with open(self.logs[i], "w") as out:
                self.procs.append(subprocess.Popen(
                    ["bash", str(REPO / "launch" / "torchrun.sh"), *inputs.overrides(run_dir)], env=env,
                    cwd=logs, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def worker(self, rank: int) -> int:
        """pid of the training process with global rank `rank` (a child of one agent)."""
        for agent in self.procs:
            for child in _children(agent.pid):
                if f"RANK={rank}" in _environ(child) and "TORCHELASTIC_RUN_ID" in _environ(child):
                    return child
        raise AssertionError(f"no worker with RANK={rank}")

    def wait(self, timeout_s: float) -> list[int]:
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            p.wait(timeout=max(1, deadline - time.monotonic()))
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
                out.extend(_children(int(entry)))
    return out


def _environ(pid: int) -> str:
    try:
        return "\n" + Path(f"/proc/{pid}/environ").read_text(errors="replace").replace("\0", "\n") + "\n"
    except OSError:
        return ""


@pytest.fixture
def torchrun_jobs(launch_inputs, tmp_path):
    jobs: list[TorchrunJob] = []
    run_dir = tmp_path / "run"

    def start() -> TorchrunJob:
        jobs.append(TorchrunJob(launch_inputs, run_dir, tmp_path, len(jobs), _free_port("127.0.0.2")))
        return jobs[-1]

    yield start, run_dir
    for job in jobs:
        job.kill()


def test_torchrun_two_nodes_kill_freeze_resume(hostfile_run, torchrun_jobs):
    """Needs n1/n2 (from the sshd fixture) and the hostfile run's losses; torchrun uses no ssh."""
    start, run_dir = torchrun_jobs

    # 1. a rank is killed after the step-8 checkpoint: the job ends fast, naming rank 1
    job = start()
    _wait(lambda: max(_losses(run_dir), default=0) >= 10, 240, "step 10", job.procs)
    os.kill(job.worker(1), signal.SIGKILL)
    t0 = time.monotonic()
    codes = job.wait(90)
    log = job.log()
    assert all(c != 0 for c in codes), log[-4000:]
    assert time.monotonic() - t0 < 60
    assert "rank(s) 1 sent no heartbeat" in log or "Signal 9 (SIGKILL) received" in log, log[-4000:]
    first = _losses(run_dir)

    # 2. the next launch resumes from step 8; then a rank freezes: the watchdog names it
    job = start()
    _wait(lambda: "24 updates (8 done)" in job.log(), 240, "the resume from step 8", job.procs)
    _wait(lambda: max(_losses(run_dir)) >= 10 and "step 10 " in job.log(), 120, "step 10 again", job.procs)
    frozen = job.worker(1)
    os.kill(frozen, signal.SIGSTOP)
    t0 = time.monotonic()
    _wait(lambda: job.procs[0].poll() is not None or job.procs[1].poll() is not None, WATCHDOG_S + 60,
          "the job to end after the freeze")
    elapsed = time.monotonic() - t0
    log = job.log()
    assert elapsed < WATCHDOG_S + 45, f"{elapsed:.0f}s"
    assert "rank 1 (host" in log and "frozen" in log, log[-4000:]
    assert f"exitcode: {EXIT_PEER_LOST}" in log or "ending the job" in log
    job.kill()  # the agent of the frozen rank: what a scheduler does with the rest of the job

    # 3. the next launch resumes from the last complete checkpoint (8) and finishes
    job = start()
    assert job.wait(300) == [0, 0], job.log()[-4000:]
    assert "24 updates (8 done)" in job.log()
    final = _losses(run_dir)
    assert sorted(final) == list(range(1, 25))
    assert all(final[s] == first[s] for s in range(1, 9))
    # same data, seeds and 2-rank ZeRO-2 world: torchrun (killed, frozen, resumed twice) and the
    # deepspeed hostfile launch (uninterrupted) train the same model
    status, log, hostfile_dir = hostfile_run
    assert status == 0, log[-3000:]
    reference = _losses(hostfile_dir)
    for step in range(1, 25):
        assert final[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
