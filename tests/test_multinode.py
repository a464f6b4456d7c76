"""Multi-node launches for real on one machine, through the repository's launch scripts: a
2-node torchrun (c10d) launch on 127.0.0.2/.3 and a 2-"node" deepspeed hostfile launch over ssh
(pdsh runner, sshd on the same two addresses), ZeRO-2. The torchrun job loses a rank (SIGKILL);
the next launch freezes one (SIGSTOP): each ends with the rank named, by the mechanism meant for
it (the peers' failure report, the heartbeat watchdog); the hostfile launch then resumes from the
last complete checkpoint, finishes, and agrees with torchrun on the loss of every step both
computed.

Event-driven: each signal is sent once the run logged the step the test waits for, and every
assertion holds whatever step it lands on (the checkpoint each launch resumes from is read from
the run, not assumed); the run is 2 epochs long so the signal cannot arrive after its end. Time
limits only end a test that would otherwise hang. A launch that loses its picked port before
binding it (EADDRINUSE) is started again on a new one."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.slurm import read_metrics
from vilbert_ds.distributed import EXIT_PEER_LOST

pytestmark = [pytest.mark.multinode, pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
WATCHDOG_S = 8  # heartbeat silence that ends the job
TOTAL = 48  # 2 epochs of 24 steps (launch_inputs: 192 samples, 2 ranks x micro 4), checkpoints every 8
PORT_IN_USE = "EADDRINUSE"


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


def _overrides(inputs, run_dir: Path) -> list[str]:
    return inputs.overrides(run_dir, **{"train.total_steps": TOTAL})


def _losses(run_dir: Path) -> dict[int, float]:
    return {step: row["train/loss"] for step, row in read_metrics(run_dir).items()}


def _latest(run_dir: Path) -> int:
    """The step of the run's newest complete checkpoint (`checkpoints/latest`)."""
    return int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step"))


def _resumed_from(log: str) -> int | None:
    """The step a launch started from, from its start line (`... 48 updates (8 done), 24 per epoch`)."""
    m = re.search(rf"{TOTAL} updates \((\d+) done\), \d+ per epoch", log)
    return int(m.group(1)) if m else None


def _built_ops() -> dict[str, float]:
    """{op .so: mtime} in the project's TORCH_EXTENSIONS_DIR (what `python -m vilbert_ds.ops build` made)."""
    from vilbert_ds.ops import extensions_dir

    return {str(p): p.stat().st_mtime for p in extensions_dir().glob("*/*.so")}


def _rows_after(run_dir: Path, offset: int) -> dict[int, float]:
    """{step: loss} of the rows appended to metrics.jsonl after byte `offset` (one launch's)."""
    import json

    with open(run_dir / "metrics.jsonl", "rb") as f:
        f.seek(offset)
        rows = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    return {int(r["step"]): r["train/loss"] for r in rows if "train/loss" in r}


def _wait(predicate, timeout_s: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if procs and all(p.poll() is not None for p in procs):
            break
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _hostfile_launch(sshd, inputs, run_dir: Path, tmp: Path) -> tuple[int, str]:
    """launch/multi_node.sh over ssh to "nodes" n1 and n2, one rank each: (exit status, log)."""
    hostfile = tmp / "hostfile"
    hostfile.write_text("n1 slots=1\nn2 slots=1\n")
    for attempt in range(3):  # a new MASTER_PORT when the picked one was taken before rank 0 bound it
        env = _base_env(inputs)
        env.update(HOSTFILE=str(hostfile), MASTER_ADDR="n1", MASTER_PORT=str(_free_port("127.0.0.2")),
                   SSH_PORT=str(sshd.port), PDSH_SSH_ARGS_APPEND=sshd.ssh_args,
                   LAUNCHER_ARGS="--no_ssh_check", DS_ENV_FILE=str(tmp / ".deepspeed_env"))
        out = subprocess.run(["bash", str(REPO / "launch" / "multi_node.sh"), *_overrides(inputs, run_dir)],
                             env=env, cwd=tmp, capture_output=True, text=True, timeout=400)
        log = out.stdout + out.stderr
        (tmp / "hostfile_launch.log").write_text(log)
        if out.returncode == 0 or PORT_IN_USE not in log:
            break
    return out.returncode, log


class TorchrunJob:
    """Two `launch/torchrun.sh` agents, "nodes" n1 (127.0.0.2) and n2 (127.0.0.3)."""

    def __init__(self, inputs, run_dir: Path, logs: Path, attempt: int, port: int):
        self.procs: list[subprocess.Popen] = []
        self.workers: set[int] = set()  # worker pids seen, killed at the end whatever happened
        self.logs = [logs / f"torchrun{attempt}.n{i + 1}.log" for i in range(2)]
        for i, (node, addr) in enumerate((("n1", "127.0.0.2"), ("n2", "127.0.0.3"))):
            env = _base_env(inputs)
            env.update(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.2:{port}", NODE_ADDR=addr,
                       RDZV_ID=f"vds-{attempt}-{port}")
            with open(self.logs[i], "w") as out:
                self.procs.append(subprocess.Popen(
                    ["bash", str(REPO / "launch" / "torchrun.sh"), *_overrides(inputs, run_dir)], env=env,
                    cwd=logs, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def lost_port(self, timeout_s: float = 240) -> bool:
        """Waits until the training started (its start line) or the agents ended; whether a port
        picked free was taken by another process before torchrun or rank 0 bound it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _resumed_from(self.log()) is None:
            if all(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.3)
        return _resumed_from(self.log()) is None and PORT_IN_USE in self.log()

    def worker(self, rank: int) -> int:
        """pid of the training process with global rank `rank` (a child of one agent)."""
        for agent in self.procs:
            for child in _children(agent.pid):
                if f"\nRANK={rank}\n" in _environ(child) and "TORCHELASTIC_RUN_ID" in _environ(child):
                    self.workers.add(child)
                    return child
        seen = {a.pid: [(c, re.findall(r"\n(RANK=\d+|TORCHELASTIC_RUN_ID)=?", _environ(c)),
                          Path(f"/proc/{c}/cmdline").read_bytes()[:80] if Path(f"/proc/{c}").exists() else b"")
                         for c in _children(a.pid)] for a in self.procs}
        raise AssertionError(f"no worker with RANK={rank}: agents' processes {seen}")

    def wait(self, timeout_s: float) -> list[int]:
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            p.wait(timeout=max(1, deadline - time.monotonic()))
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        """SIGKILL the agents and every worker, including a stopped one whose agent is gone
        (torchrun's workers live in their own sessions; an orphan would stay stopped forever)."""
        pids = set(self.workers)
        for p in self.procs:
            pids.update(_children(p.pid))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
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
        """Two agents, past the rendezvous and training (on a new port when the first was lost)."""
        for attempt in range(3):
            jobs.append(TorchrunJob(launch_inputs, run_dir, tmp_path, len(jobs), _free_port("127.0.0.2")))
            if attempt == 2 or not jobs[-1].lost_port():
                return jobs[-1]
            jobs[-1].kill()
        raise AssertionError("unreachable")

    yield start, run_dir
    for job in jobs:
        job.kill()


def test_two_node_launches_kill_freeze_resume_and_agree(sshd_nodes, launch_inputs, torchrun_jobs, tmp_path):
    """One run, three launches on two "nodes": torchrun (a rank is killed), torchrun again (it
    resumes; a rank freezes), then the deepspeed hostfile launcher over ssh (it resumes and
    finishes). Both launchers compute the same losses for the steps after the checkpoint."""
    start, run_dir = torchrun_jobs

    # 1. torchrun: a rank is killed once step 10 is logged (after the step-8 checkpoint); the job
    #    ends, its peers naming the killed rank
    job = start()
    _wait(lambda: max(_losses(run_dir), default=0) >= 10, 240, "step 10", job.procs)
    os.kill(job.worker(1), signal.SIGKILL)
    codes = job.wait(300)  # the peers' failure report ends it in seconds; this only ends a hung test
    log = job.log()
    assert all(c != 0 for c in codes), log[-4000:]
    assert "rank(s) 1 sent no heartbeat" in log and "killed or frozen" in log, log[-4000:]
    assert "Signal 9 (SIGKILL) received" in log  # torchrun's own summary names the rank too
    first = _losses(run_dir)
    killed_at, ckpt1 = max(first), _latest(run_dir)
    assert 8 <= ckpt1 <= killed_at < TOTAL and ckpt1 % 8 == 0, (ckpt1, killed_at)

    # 2. torchrun again: resumes from that checkpoint; two steps later a rank freezes and the
    #    watchdog names it (the collective timeout, 120 s, is not what ends it)
    offset = (run_dir / "metrics.jsonl").stat().st_size
    job = start()
    assert _resumed_from(job.log()) == ckpt1, job.log()[-3000:]
    _wait(lambda: max(_rows_after(run_dir, offset), default=0) >= ckpt1 + 2, 240, f"step {ckpt1 + 2}", job.procs)
    os.kill(job.worker(1), signal.SIGSTOP)
    _wait(lambda: any(p.poll() is not None for p in job.procs), 300, "the job to end after the freeze")
    log = job.log()
    assert "ending the job: rank 1 (host" in log and "sent no heartbeat" in log and "frozen" in log, log[-4000:]
    assert f"exitcode  : {EXIT_PEER_LOST}" in log, log[-4000:]
    job.kill()  # the agent of the frozen rank: what the scheduler does with the rest of a failed job
    second = _rows_after(run_dir, offset)
    both = sorted(set(first) & set(second))  # computed by both launches, after the same checkpoint
    assert both or killed_at == ckpt1
    assert all(second[s] == first[s] for s in both), "a resumed run repeats the same steps exactly"

    # 3. the hostfile launcher resumes the same run from the last complete checkpoint, finishes
    ckpt2 = _latest(run_dir)
    assert ckpt1 <= ckpt2 <= max(second)
    built = _built_ops()
    status, log = _hostfile_launch(sshd_nodes, launch_inputs, run_dir, tmp_path)
    assert status == 0, log[-5000:]
    assert "n1: " in log and "n2: " in log, log[-3000:]  # pdsh prefixes each node's output
    assert "2 ranks (deepspeed)" in log and "ZeRO-2" in log and _resumed_from(log) == ckpt2, log[-3000:]
    env_file = (tmp_path / ".deepspeed_env").read_text()  # what had to cross nodes
    assert "DS_ACCELERATOR=cpu" in env_file and "TORCH_EXTENSIONS_DIR=" in env_file
    assert f"VILBERT_DS_WATCHDOG_S={WATCHDOG_S}" in env_file
    assert str(Path(sys.executable).parent) in (tmp_path / ".deepspeed_env.venv.sh").read_text()
    assert built and _built_ops() == built, "a node rebuilt DeepSpeed's ops (another ninja on PATH?)"
    final = _losses(run_dir)
    assert sorted(final) == list(range(1, TOTAL + 1))
    # same checkpoint, data, seeds and 2-rank ZeRO-2 world: torchrun and deepspeed agree
    again = [s for s in sorted(second) if s > ckpt2]
    assert again or max(second) == ckpt2
    for step in again:
        assert final[step] == pytest.approx(second[step], rel=1e-6, abs=1e-6), step
    from vilbert_ds.trainer import read_sample_log

    by_step = {}
    for ranks_steps in read_sample_log(run_dir).values():
        for step, keys in ranks_steps.items():
            by_step.setdefault(step, []).extend(keys)
    per_epoch = TOTAL // 2
    for epoch in range(2):  # every sample once per epoch, nothing repeated or skipped across the launches
        keys = [k for s in range(epoch * per_epoch + 1, (epoch + 1) * per_epoch + 1) for k in by_step[s]]
        assert len(keys) == len(set(keys)) == launch_inputs.num_samples, epoch
