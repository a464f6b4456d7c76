"""Real gloo ranks (plain processes, torch.distributed via vilbert_ds.distributed): a signal that
reaches one rank stops all of them at the same step; a frozen store host (SIGSTOP on rank 0) and
a hung rank each end the job with the culprit named, by the mechanism meant for it (the
heartbeat watchdog, the collective timeout); a rank that never shows up is named by the
rendezvous.

Event-driven: each signal is sent after every rank logged the step it waits for, and each
assertion holds whatever step the signal lands on and however fast or loaded the machine is
(the time limits only end a test that would otherwise hang). A launch whose rendezvous port was
taken between the pick and rank 0's bind is started again on a new port."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vilbert_ds.distributed import EXIT_PEER_LOST
from vilbert_ds.preemption import EXIT_STOPPED

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]

# One rank: init, then a loop of all-reduces on a group created after init (DeepSpeed creates
# such groups; torch would give them a 30-minute timeout), checking StopSignal at each step.
WORKER = r"""
import json, sys, time
import torch, torch.distributed as dist
from vilbert_ds.distributed import DistEnv, init_distributed, shutdown_distributed
from vilbert_ds.preemption import StopSignal, EXIT_STOPPED
cfg = json.loads(sys.argv[1])
env = DistEnv.from_env()
init_distributed(env, init_timeout_s=cfg.get("init", 60), timeout_s=cfg.get("timeout", 60),
                 watchdog_s=cfg.get("watchdog"), heartbeat_s=cfg.get("heartbeat"))
group = dist.new_group()
phases = cfg.get("phases", 1)
for phase in range(phases):
    stop = StopSignal()
    print(f"rank {env.rank} phase {phase} ready", flush=True)
    for step in range(1, 100000):
        if step == 3 and cfg.get("hang_rank") == env.rank:
            time.sleep(3600)  # the main thread hangs; the process (and its heartbeat) lives on
        x = torch.ones(8)
        dist.all_reduce(x, group=group)
        assert int(x[0]) == env.world_size
        print(f"rank {env.rank} phase {phase} step {step}", flush=True)
        if stop.should_stop(step):
            print("RESULT " + json.dumps({"rank": env.rank, "phase": phase, "step": step,
                                          "received": stop.received}), flush=True)
            break
        time.sleep(0.05)
    stop.restore()
shutdown_distributed()
sys.exit(EXIT_STOPPED)
"""


class Ranks:
    """N worker processes on 127.0.0.1 with their output in files under tmp_path."""

    def __init__(self, tmp_path, world: int, cfg: dict, ranks: list[int] | None = None):
        self.tmp = tmp_path
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs = {r: tmp_path / f"rank{r}.log" for r in range(world)}
        port = _free_port()
        for r in ranks if ranks is not None else range(world):
            env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
            with open(self.logs[r], "w") as out:
                self.procs[r] = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(cfg)], env=env,
                                                 stdout=out, stderr=subprocess.STDOUT)

    def log(self, r: int) -> str:
        return self.logs[r].read_text(errors="replace")

    def wait_for(self, text: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(text.format(rank=r) in self.log(r) for r in self.procs):
                return
            if any(p.poll() is not None for p in self.procs.values()):
                break
            time.sleep(0.1)
        raise AssertionError(f"ranks never printed {text!r}:\n" + "\n".join(self.log(r)[-3000:] for r in self.procs))

    def signal(self, r: int, sig: int) -> None:
        self.procs[r].send_signal(sig)

    def wait(self, r: int, timeout_s: float) -> int:
        return self.procs[r].wait(timeout=timeout_s)

    def results(self) -> list[dict]:
        out = []
        for r in self.procs:
            out += [json.loads(line[7:]) for line in self.log(r).splitlines() if line.startswith("RESULT ")]
        return out

    def lost_port(self, timeout_s: float = 60) -> bool:
        """Whether rank 0 lost its rendezvous port to another process (the port was free when
        picked, taken before rank 0 bound it): waits until every rank is past the rendezvous
        (or ended)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all("phase 0 ready" in self.log(r) for r in self.procs):
                return False
            if any(p.poll() is not None for p in self.procs.values()):
                break
            time.sleep(0.1)
        return any("EADDRINUSE" in self.log(r) for r in self.procs)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()  # SIGKILL also ends a stopped process
                p.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ranks(tmp_path):
    started: list[Ranks] = []

    def start(world: int, cfg: dict, only: list[int] | None = None) -> Ranks:
        for attempt in range(3):  # a new port when the picked one was taken before rank 0 bound it
            started.append(Ranks(tmp_path / f"launch{len(started)}", world, cfg, only))
            if attempt == 2 or not started[-1].lost_port():
                return started[-1]
            started[-1].close()
        raise AssertionError("unreachable")

    yield start
    for r in started:
        r.close()


def test_signal_to_one_rank_stops_all_at_the_same_step(ranks):
    """Phase 0: SIGUSR1 to rank 1 only. Phase 1: SIGTERM to rank 0 only (the preemption path
    without a warning). Each time both ranks stop after the same step, and exit EXIT_STOPPED."""
    job = ranks(2, {"phases": 2, "watchdog": 30})
    job.wait_for("rank {rank} phase 0 step 3")
    job.signal(1, signal.SIGUSR1)
    job.wait_for("rank {rank} phase 1 step 3")
    job.signal(0, signal.SIGTERM)
    assert job.wait(0, 60) == EXIT_STOPPED and job.wait(1, 60) == EXIT_STOPPED, job.log(0) + job.log(1)
    results = {(r["phase"], r["rank"]): r for r in job.results()}
    assert set(results) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for phase, signalled, peer in ((0, 1, 0), (1, 0, 1)):
        assert results[phase, 0]["step"] == results[phase, 1]["step"]
        assert results[phase, signalled]["received"] == ("SIGUSR1" if phase == 0 else "SIGTERM")
        assert results[phase, peer]["received"] == "peer"


def test_frozen_store_host_is_named_by_the_watchdog(ranks):
    """SIGSTOP on rank 0: the process lives, its sockets stay open, the c10d store it hosts stops
    answering and nothing errors by itself. Rank 1's watchdog names it after watchdog_s of
    silence and ends the job (EXIT_PEER_LOST); the collective timeout (10 minutes here) is not
    what ends it. (A frozen and a killed non-zero rank: tests/test_multinode.py, through torchrun.)"""
    frozen, watchdog_s = 0, 5
    job = ranks(2, {"watchdog": watchdog_s, "heartbeat": 0.5, "timeout": 600})
    job.wait_for("rank {rank} phase 0 step 3")
    job.signal(frozen, signal.SIGSTOP)
    survivor = 1 - frozen
    rc = job.wait(survivor, 300)  # only ends a hung test: the watchdog answers in ~watchdog_s
    log = job.log(survivor)
    assert rc == EXIT_PEER_LOST, log
    assert f"ending the job: rank {frozen} (host " in log and "is frozen" in log, log
    assert f"did not answer for {watchdog_s}s" in log, log


def test_hung_rank_ends_at_the_collective_timeout_on_groups_made_after_init(ranks):
    """The hung rank's heartbeat goes on, so only the collective timeout can end this; the group
    was created after init, where torch's default would be 30 minutes (the test would time out)."""
    job = ranks(2, {"watchdog": 600, "heartbeat": 0.5, "timeout": 4, "hang_rank": 1})
    job.wait_for("rank {rank} phase 0 step 2")
    rc = job.wait(0, 300)  # only ends a hung test: the timeout answers in ~4 s
    log0 = job.log(0)
    assert rc not in (0, EXIT_STOPPED, EXIT_PEER_LOST), log0
    assert "Timed out" in log0 and "last steps: rank 1=2" in log0, log0
    assert "sent no heartbeat" not in log0  # the timeout, not the watchdog


def test_missing_rank_is_named_at_rendezvous(ranks):
    job = ranks(2, {"init": 3, "watchdog": 10}, only=[0])
    rc = job.wait(0, 60)
    log0 = job.log(0)
    assert rc != 0
    assert "rendezvous timed out after init_timeout_s=3s: rank(s) 1 never joined" in log0, log0


def test_stop_signal_in_one_process():
    """No process group: the local flag alone decides; check_every skips steps; restore()."""
    from vilbert_ds.preemption import StopSignal

    previous = signal.getsignal(signal.SIGUSR1)
    stop = StopSignal(check_every=2)
    try:
        assert not stop.should_stop(1) and not stop.should_stop(2)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.local and stop.received == "SIGUSR1"
        assert not stop.should_stop(3)  # not a checking step
        assert stop.should_stop(4) and stop.stop_step == 4
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) == previous
