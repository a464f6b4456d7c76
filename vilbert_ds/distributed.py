"""The one place that reads the distributed environment, and the fail-fast glue around it.

`DistEnv.from_env()` understands torchrun (RANK, LOCAL_RANK, GROUP_RANK, LOCAL_WORLD_SIZE,
TORCHELASTIC_*), the deepspeed launcher (RANK, LOCAL_RANK, CROSS_RANK, LOCAL_SIZE), SLURM's srun
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID, SLURM_STEP_NODELIST,
SLURM_STEP_TASKS_PER_NODE, SLURM_JOB_ID, SLURM_RESTART_COUNT) and MPI (OMPI_COMM_WORLD_*, PMI_*),
and returns a frozen value. Nothing else in vilbert-ds reads RANK or SLURM_* variables.

`init_distributed(env, init_timeout_s=..., timeout_s=...)` starts torch.distributed with two
separate bounds: the rendezvous (every rank must show up within `init_timeout_s`) and every
later collective (`timeout_s`, also applied to the groups DeepSpeed creates later, which torch
would otherwise give its 30-minute default). It then starts a `PeerWatchdog`: a heartbeat per
rank in the c10d store, so a rank that freezes (SIGSTOP, a hung node) or dies is named in the
log and the job ends within `watchdog_s` instead of hanging. End a run with
`shutdown_distributed()` (barrier + destroy_process_group; without it gloo rarely aborts at exit).

Exit statuses used by this module: `EXIT_PEER_LOST` when the watchdog ends a rank because a peer
is frozen or dead.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

log = logging.getLogger(__name__)

# SLURM jobs derive their rendezvous port from the job id, in [base, base + span). The range stays
# below Linux's ephemeral ports (32768-60999) so an outgoing connection never holds it.
DEFAULT_PORT_BASE = 15000
DEFAULT_PORT_SPAN = 15000
DEFAULT_MASTER_PORT = 29500

EXIT_PEER_LOST = 76  # a peer rank froze or died; the watchdog ended this rank (75 = stopped by a signal)
DEFAULT_WATCHDOG_S = 120.0  # heartbeat silence that ends the job (capped by the collective timeout)
DIAGNOSE_MAX_S = 10.0  # at most this long watching heartbeats to name a dead peer after an error

LAUNCHERS = ("single", "torchrun", "deepspeed", "slurm", "mpi", "env")  # env: RANK etc. set by hand


class DistEnvError(ValueError):
    """The launcher's environment is incomplete or inconsistent; the message names the variable."""


# ----------------------------------------------------------------------------------------------
# Reading the environment


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM hostlist syntax -> host names, in order.

    'gpu[01-03,07],cpu1' -> gpu01 gpu02 gpu03 gpu07 cpu1; 'r[1-2]n[1-2]' -> r1n1 r1n2 r2n1 r2n2.
    Zero padding follows the lower bound's width, as SLURM does.
    """
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        if part:
            hosts.extend(_expand_host(part, nodelist))
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _expand_host(pattern: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if m is None:
        if "[" in pattern or "]" in pattern:
            raise DistEnvError(f"SLURM node list {whole!r}: unbalanced brackets in {pattern!r}")
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end() :]
    out = []
    for rng in m.group(1).split(","):
        if "-" in rng:
            lo, hi = rng.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise DistEnvError(f"SLURM node list {whole!r}: bad range {rng!r}")
            values = [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
        else:
            if not rng:
                raise DistEnvError(f"SLURM node list {whole!r}: empty range in {pattern!r}")
            values = [rng]
        for v in values:
            out.extend(_expand_host(head + v + tail, whole))  # later brackets in the same name
    return out


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE syntax -> tasks on each node: '2(x3),1' -> [2, 2, 2, 1]."""
    out: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if m is None:
            raise DistEnvError(f"SLURM tasks-per-node {spec!r}: cannot parse {item!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def port_for_job(job_id: str, base: int = DEFAULT_PORT_BASE, span: int = DEFAULT_PORT_SPAN) -> int:
    """A rendezvous port that differs between jobs sharing a node, is the same for all ranks of
    a job, and survives requeues (the job id does not change when SLURM requeues)."""
    return base + zlib.crc32(str(job_id).encode()) % span


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for name in names:
        value = env.get(name, "")
        if value != "":
            try:
                return int(value)
            except ValueError:
                raise DistEnvError(f"environment variable {name}={value!r} is not an integer") from None
    return default


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. Build it with `DistEnv.from_env()`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    launcher: str = "single"  # one of LAUNCHERS
    restart_count: int = 0  # SLURM_RESTART_COUNT (requeues) or TORCHELASTIC_RESTART_COUNT
    job_id: str | None = None  # SLURM_JOB_ID or TORCHELASTIC_RUN_ID
    host: str = ""  # SLURMD_NODENAME under SLURM, else the hostname; for log messages
    use_agent_store: bool = False  # torchrun's agent hosts the c10d store (all ranks are clients)
    slurm_job_id: str | None = None  # SLURM_JOB_ID whatever the launcher: the job to requeue

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise DistEnvError(f"launcher {self.launcher!r} is not one of {LAUNCHERS}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise DistEnvError(f"{self.launcher} launch: rank {self.rank} outside world size {self.world_size}")
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            raise DistEnvError(
                f"{self.launcher} launch: local rank {self.local_rank} outside local world size "
                f"{self.local_world_size}"
            )
        if self.num_nodes < 1 or not 0 <= self.node_rank < self.num_nodes:
            raise DistEnvError(f"{self.launcher} launch: node rank {self.node_rank} outside {self.num_nodes} nodes")
        if not 0 < self.master_port < 65536:
            raise DistEnvError(f"{self.launcher} launch: MASTER_PORT {self.master_port} is not a TCP port")
        if self.restart_count < 0:
            raise DistEnvError(f"restart count {self.restart_count} is negative")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        """'rank 1/4 (local 1/2, node 0/2, host n1, slurm job 17, restart 1)' for log lines."""
        extra = [f"local {self.local_rank}/{self.local_world_size}", f"node {self.node_rank}/{self.num_nodes}"]
        if self.host:
            extra.append(f"host {self.host}")
        if self.job_id:
            extra.append(f"{self.launcher} job {self.job_id}")
        extra.append(f"restart {self.restart_count}")
        return f"rank {self.rank}/{self.world_size} ({', '.join(extra)})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "DistEnv":
        """Read the launcher's variables.

        RANK/WORLD_SIZE come from torchrun (TORCHELASTIC_RUN_ID), the deepspeed launcher
        (CROSS_RANK, LOCAL_SIZE) or an explicit setup ("env"); they win over SLURM's variables,
        since both launchers also run inside SLURM allocations. RANK equal to SLURM_PROCID with
        WORLD_SIZE equal to the step's task count is srun's own rank, exported earlier by
        `DistEnv.export()`. Then srun (SLURM_PROCID), mpirun, else one process."""
        env = os.environ if env is None else env
        value = cls._read(env)
        slurm_job = env.get("SLURM_JOB_ID") or None
        return value if value.slurm_job_id == slurm_job else replace(value, slurm_job_id=slurm_job)

    @classmethod
    def _read(cls, env: Mapping[str, str]) -> "DistEnv":
        restart = _int(env, "TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT", default=0)
        host = env.get("SLURMD_NODENAME") or socket.gethostname()
        slurm = "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env)
        if "RANK" in env:
            if "TORCHELASTIC_RUN_ID" in env:
                return cls._from_torch_vars(env, restart, host, "torchrun")
            if "CROSS_RANK" in env or "LOCAL_SIZE" in env:
                return cls._from_torch_vars(env, restart, host, "deepspeed")
            slurm_world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
            if slurm and env["RANK"] == env["SLURM_PROCID"] and env.get("WORLD_SIZE") == slurm_world:
                return cls._from_slurm(env, restart, host)
            return cls._from_torch_vars(env, restart, host, "env")
        if slurm:
            return cls._from_slurm(env, restart, host)
        if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
            return cls._from_mpi(env, restart, host)
        return cls(restart_count=restart, job_id=env.get("SLURM_JOB_ID") or None, host=host)

    @classmethod
    def _from_torch_vars(cls, env: Mapping[str, str], restart: int, host: str, launcher: str) -> "DistEnv":
        rank = _int(env, "RANK")
        world = _int(env, "WORLD_SIZE")
        if world is None:
            raise DistEnvError(f"{launcher} launch: RANK={rank} is set but WORLD_SIZE is not")
        # torchrun: LOCAL_WORLD_SIZE, GROUP_RANK, GROUP_WORLD_SIZE;
        # deepspeed launcher: LOCAL_SIZE, CROSS_RANK, CROSS_SIZE. Neither: all ranks on one node.
        # Each launcher's own names are read first: the other's may be stale in the environment
        # (e.g. LOCAL_WORLD_SIZE left by an earlier single-process run, which the deepspeed
        # launcher does not overwrite).
        if launcher == "deepspeed":
            local_names, nodes_names, node_rank_names = ("LOCAL_SIZE",), ("CROSS_SIZE",), ("CROSS_RANK",)
        else:
            local_names, nodes_names, node_rank_names = ("LOCAL_WORLD_SIZE",), ("GROUP_WORLD_SIZE",), ("GROUP_RANK",)
        local_world = _int(env, *local_names, default=world)
        num_nodes = _int(env, *nodes_names, default=max(1, -(-world // local_world)))
        node_rank = _int(env, *node_rank_names, "NODE_RANK", default=rank // local_world)
        torchrun = launcher == "torchrun"
        return cls(
            rank=rank,
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK", default=rank % local_world),
            local_world_size=local_world,
            node_rank=node_rank,
            num_nodes=num_nodes,
            master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
            master_port=_int(env, "MASTER_PORT", default=DEFAULT_MASTER_PORT),
            launcher=launcher,
            restart_count=restart,
            job_id=(env.get("TORCHELASTIC_RUN_ID") if torchrun else env.get("SLURM_JOB_ID")) or None,
            host=host,
            use_agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        )

    @classmethod
    def _from_slurm(cls, env: Mapping[str, str], restart: int, host: str) -> "DistEnv":
        """srun, one task per GPU. The step's node list (not the allocation's) holds rank 0's
        node first under SLURM's default block distribution; an explicit MASTER_ADDR (the sbatch
        scripts set it) wins."""
        job_id = env.get("SLURM_JOB_ID") or None
        rank = _int(env, "SLURM_PROCID")
        world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
        if world is None:
            raise DistEnvError("slurm launch: SLURM_PROCID is set but SLURM_NTASKS is not (start ranks with srun)")
        if world > 1 and "SLURM_STEP_ID" not in env:
            # the batch script itself: one process where the job asked for `world` tasks
            raise DistEnvError(
                f"slurm job {job_id}: SLURM_NTASKS={world} but this process is the batch script, not an srun "
                "task; start the ranks with `srun python -m ...` (see slurm/pretrain.sbatch)"
            )
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        nodes = expand_nodelist(nodelist) if nodelist else [host]
        num_nodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", default=len(nodes))
        node_rank = _int(env, "SLURM_NODEID", default=0)
        per_node_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
        if per_node_spec:
            per_node = expand_tasks_per_node(per_node_spec)
            local_world = per_node[node_rank] if node_rank < len(per_node) else per_node[-1]
        else:
            local_world = max(1, -(-world // num_nodes))
        master_port = _int(env, "MASTER_PORT", default=None)
        if master_port is None:
            master_port = port_for_job(job_id or "0")
        return cls(
            rank=rank,
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID", default=0),
            local_world_size=local_world,
            node_rank=node_rank,
            num_nodes=num_nodes,
            master_addr=env.get("MASTER_ADDR") or nodes[0],
            master_port=master_port,
            launcher="slurm",
            restart_count=restart,
            job_id=job_id,
            host=host,
        )

    @classmethod
    def _from_mpi(cls, env: Mapping[str, str], restart: int, host: str) -> "DistEnv":
        rank = _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK")
        world = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
        if world is None:
            raise DistEnvError("mpi launch: the rank is set but OMPI_COMM_WORLD_SIZE / PMI_SIZE is not")
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", default=world)
        if world > local_world and not env.get("MASTER_ADDR"):
            # MPI says nothing about a TCP rendezvous; 127.0.0.1 is only right on one node.
            raise DistEnvError("mpi launch across nodes: set MASTER_ADDR (and MASTER_PORT) to rank 0's host")
        return cls(
            rank=rank,
            world_size=world,
            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", default=0),
            local_world_size=local_world,
            node_rank=_int(env, "OMPI_COMM_WORLD_NODE_RANK", default=rank // local_world),
            num_nodes=max(1, -(-world // local_world)),
            master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
            master_port=_int(env, "MASTER_PORT", default=DEFAULT_MASTER_PORT),
            launcher="mpi",
            restart_count=restart,
            job_id=env.get("SLURM_JOB_ID") or None,
            host=host,
        )

    def export(self, environ: dict | None = None) -> None:
        """Write the variables torch.distributed and DeepSpeed read (RANK, WORLD_SIZE, LOCAL_RANK,
        LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
        environ = os.environ if environ is None else environ
        environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def hostname() -> str:
    return socket.gethostname()


# ----------------------------------------------------------------------------------------------
# Starting and ending torch.distributed

_watchdog: "PeerWatchdog | None" = None
_KEY = "vilbert_ds"  # prefix of this module's keys in the c10d store


def init_distributed(
    env: DistEnv,
    backend: str | None = None,
    init_timeout_s: float = 300.0,
    timeout_s: float = 600.0,
    watchdog_s: float | None = None,
    heartbeat_s: float | None = None,
) -> None:
    """Start torch.distributed (and DeepSpeed's comm layer) for `env`.

    init_timeout_s: seconds for every rank to join the rendezvous; a missing rank is named.
    timeout_s: seconds any later collective may wait, on the default group and on every group
        created later (DeepSpeed's), so a hung rank ends the job instead of stalling it.
    watchdog_s: a rank whose heartbeat has not advanced for this long is reported frozen or
        dead, and the job ends with `EXIT_PEER_LOST`; 0 turns the watchdog off. Default: the
        environment's VILBERT_DS_WATCHDOG_S, else min(timeout_s, DEFAULT_WATCHDOG_S).
    heartbeat_s: seconds between heartbeats (default: VILBERT_DS_HEARTBEAT_S, else
        watchdog_s / 10 within [0.2, 5]).
    """
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if init_timeout_s <= 0 or timeout_s <= 0:
        raise ValueError(f"init_timeout_s={init_timeout_s} and timeout_s={timeout_s} must be positive")
    env.export()
    if backend is None:
        backend = _default_backend()
    if backend == "nccl" and torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")

    # torch gives every group created after init its 30-minute default, whatever the default
    # group got; DeepSpeed creates several. Lower that default before anything creates them.
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = datetime.timedelta(seconds=timeout_s)
    timeout = datetime.timedelta(seconds=timeout_s)

    if env.world_size == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        store = _connect_store(env, init_timeout_s)
        # gloo bounds its own connection setup by the collective timeout, so the wait for late
        # ranks happens here, on the store, bounded by init_timeout_s.
        try:
            store.wait([f"joined/{r}" for r in range(env.world_size)], datetime.timedelta(seconds=init_timeout_s))
        except Exception as e:  # noqa: BLE001 - re-raised with the missing ranks named
            raise RuntimeError(
                f"{env.describe()}: rendezvous timed out after init_timeout_s={init_timeout_s:g}s: "
                f"{_missing_ranks(store, env)}; cause: {_first_line(e)}"
            ) from e
        try:
            dist.init_process_group(
                backend, store=dist.PrefixStore("default_pg", store), rank=env.rank, world_size=env.world_size, timeout=timeout
            )
        except Exception as e:  # noqa: BLE001 - re-raised with the missing ranks named
            raise RuntimeError(
                f"{env.describe()}: process group setup failed within timeout_s={timeout_s:g}s: "
                f"{_missing_ranks(store, env)}; cause: {_first_line(e)}"
            ) from e
    # Safety net for entry points that end without shutdown_distributed(): a process group
    # still alive at interpreter teardown sometimes aborts the process (gloo threads).
    atexit.register(_destroy_at_exit)
    if env.world_size > 1:
        watchdog_s, heartbeat_s = _watchdog_settings(watchdog_s, heartbeat_s, timeout_s)
        if watchdog_s:
            start_watchdog(env, _store_client(env, watchdog_s), watchdog_s, heartbeat_s)

    if "deepspeed" in sys.modules:
        import deepspeed

        # torch.distributed is up, so DeepSpeed only wraps it (no MPI discovery, no second init);
        # when DeepSpeed is imported later, deepspeed.initialize() wraps it the same way.
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    log.info("torch.distributed up: %s, backend %s, collective timeout %gs", env.describe(), backend, timeout_s)


def _watchdog_settings(watchdog_s: float | None, heartbeat_s: float | None, timeout_s: float) -> tuple[float, float | None]:
    """Arguments first, then VILBERT_DS_WATCHDOG_S / VILBERT_DS_HEARTBEAT_S (launch scripts set
    them for every entry point at once), then the defaults."""
    try:
        if watchdog_s is None and os.environ.get("VILBERT_DS_WATCHDOG_S", "") != "":
            watchdog_s = float(os.environ["VILBERT_DS_WATCHDOG_S"])
        if heartbeat_s is None and os.environ.get("VILBERT_DS_HEARTBEAT_S", "") != "":
            heartbeat_s = float(os.environ["VILBERT_DS_HEARTBEAT_S"])
    except ValueError as e:
        raise DistEnvError(f"VILBERT_DS_WATCHDOG_S / VILBERT_DS_HEARTBEAT_S must be seconds: {e}") from None
    if watchdog_s is None:
        watchdog_s = min(timeout_s, DEFAULT_WATCHDOG_S)
    return float(watchdog_s), heartbeat_s


def _default_backend() -> str:
    """DeepSpeed's choice for the accelerator when DeepSpeed is loaded, else nccl on CUDA, gloo
    on CPU (importing DeepSpeed only to ask costs seconds per rank)."""
    if "deepspeed" in sys.modules:
        from deepspeed.accelerator import get_accelerator

        return get_accelerator().communication_backend_name()
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def _connect_store(env: DistEnv, init_timeout_s: float):
    """The job's c10d TCPStore: rank 0 hosts it unless torchrun's agent does; every rank records
    that it joined, so a rendezvous timeout can name the ranks that never came."""
    import torch.distributed as dist

    is_master = env.rank == 0 and not env.use_agent_store
    where = f"{env.master_addr}:{env.master_port}"
    try:
        store = dist.TCPStore(
            env.master_addr,
            env.master_port,
            env.world_size,
            is_master,
            timeout=datetime.timedelta(seconds=init_timeout_s),
            wait_for_workers=False,
            multi_tenant=True,
        )
    except Exception as e:  # noqa: BLE001 - re-raised with the address and the likely cause
        if is_master:
            hint = "is another job using this port? set MASTER_PORT"
        else:
            hint = f"rank 0 did not open its store within init_timeout_s={init_timeout_s:g}s (is it running? is MASTER_ADDR right?)"
        raise RuntimeError(f"{env.describe()}: cannot reach the c10d store at {where}: {hint}; cause: {_first_line(e)}") from e
    store = dist.PrefixStore(f"{_KEY}/{env.restart_count}", store)  # a restart never sees old keys
    store.set(f"joined/{env.rank}", env.host or hostname())
    return store


def _store_client(env: DistEnv, timeout_s: float):
    """A second connection to the job's store for the watchdog thread, timing out after
    `timeout_s` so that a frozen store host shows up as a timeout instead of a hang."""
    import torch.distributed as dist

    client = dist.TCPStore(
        env.master_addr, env.master_port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
    )
    return dist.PrefixStore(f"{_KEY}/{env.restart_count}", client)


def _missing_ranks(store, env: DistEnv) -> str:
    try:
        missing = [r for r in range(env.world_size) if not store.check([f"joined/{r}"])]
    except Exception as e:  # noqa: BLE001 - the store itself is gone
        return f"the store at {env.master_addr}:{env.master_port} stopped answering ({_first_line(e)})"
    if not missing:
        return "every rank joined the store, but the process group could not connect them"
    return f"rank(s) {_ranks_text(missing)} never joined (store {env.master_addr}:{env.master_port})"


def shutdown_distributed(timeout_s: float = 60.0) -> None:
    """End a run cleanly: stop the watchdog, barrier, destroy the process group.

    Every rank must call it. Without the barrier a fast rank 0 can tear down the store while
    others still use it, and gloo sometimes aborts at interpreter exit."""
    import torch.distributed as dist

    stop_watchdog()
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_world_size() > 1 and dist.get_backend() == "gloo":
            # names the ranks that do not arrive, where a plain barrier would only time out
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
        elif dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _destroy_at_exit() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway; never turn an exit into a traceback
            pass


# ----------------------------------------------------------------------------------------------
# Heartbeats: naming a frozen or dead rank


class PeerWatchdog:
    """Heartbeats through the c10d store, on a daemon thread with its own store connection
    (`store`, whose timeout should be `watchdog_s`: see `_store_client`).

    Every rank sets `hb/<rank>` to "<beat> <step>" each `heartbeat_s`. Rank 0 reads all of them;
    the other ranks read rank 0's and the `abort` key. A rank whose beat has not changed for
    `watchdog_s` (on the watcher's own clock, so node clocks need not agree) is frozen or dead:
    the watcher logs it by rank and host, publishes the reason under `abort` so every rank exits
    with the same message, and ends its own process with `EXIT_PEER_LOST` (the launcher then
    kills what is left, including a stopped process). A store that stops answering means rank 0
    (which hosts it) is frozen. Ranks that exit normally record `exited/<rank>` first, so they
    are not mistaken for dead ones. The training thread only updates `step` (a plain attribute).
    """

    def __init__(
        self,
        env: DistEnv,
        store,
        watchdog_s: float,
        heartbeat_s: float | None = None,
        on_lost: Callable[[str], None] | None = None,
    ):
        if watchdog_s <= 0:
            raise ValueError(f"watchdog_s={watchdog_s} must be positive")
        self.env = env
        self.watchdog_s = float(watchdog_s)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s else max(0.2, min(5.0, self.watchdog_s / 10))
        if self.heartbeat_s >= self.watchdog_s:
            raise ValueError(f"heartbeat_s={self.heartbeat_s} must be shorter than watchdog_s={self.watchdog_s}")
        self.step: int = -1  # last step boundary the training loop reached (set by StopSignal)
        self._store = store
        self._on_lost = on_lost or _exit_peer_lost
        self._stop = threading.Event()
        self._lost_once = threading.Event()
        self._beat = 0
        self._hosts: dict[int, str] = {}
        self._alive = time.monotonic()  # when the watchdog loop last completed its store calls
        self._thread = threading.Thread(target=self._run, name="vilbert-ds-watchdog", daemon=True)
        self._guard = threading.Thread(target=self._guard_run, name="vilbert-ds-watchdog-guard", daemon=True)

    def start(self) -> "PeerWatchdog":
        # Host names now, while the store answers for sure (every rank joined moments ago).
        keys = [f"joined/{r}" for r in range(self.env.world_size)]
        self._hosts = {r: "host " + h.decode() for r, h in enumerate(self._store.multi_get(keys))}
        self._beat_once()
        self._alive = time.monotonic()
        self._thread.start()
        self._guard.start()
        return self

    def stop(self, exited: bool = True) -> None:
        """Stop beating; with `exited`, tell the others this rank left on purpose."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self.heartbeat_s + 5)
        if exited:
            # bounded: at exit the store host may be frozen or gone
            _bounded(lambda: self._store.set(f"exited/{self.env.rank}", "1"), self.heartbeat_s + 5)

    def _beat_once(self) -> None:
        self._beat += 1
        self._store.set(f"hb/{self.env.rank}", f"{self._beat} {self.step}")

    def _run(self) -> None:
        try:
            self._watch()
        except Exception:  # noqa: BLE001 - a watchdog bug must not end a healthy job
            log.exception("watchdog on rank %d failed; this rank is no longer watched", self.env.rank)
            self._stop.set()
            _bounded(lambda: self._store.set(f"exited/{self.env.rank}", "watchdog failed"), self.heartbeat_s + 5)

    def _watch(self) -> None:
        watched = list(range(self.env.world_size)) if self.env.rank == 0 else [0]
        watched = [r for r in watched if r != self.env.rank]
        last: dict[int, str] = {}
        changed: dict[int, float] = {r: time.monotonic() for r in watched}
        while not self._stop.wait(self.heartbeat_s):
            started = time.monotonic()
            try:
                self._beat_once()
                # `get` and `wait` honour the store timeout; `check` would block forever on a
                # frozen store host (the guard thread covers every call anyway).
                abort = self._store.multi_get(["abort"]) if self._store.check(["abort"]) else None
                beats = self._store.multi_get([f"hb/{r}" for r in watched]) if watched else []
            except Exception as e:  # noqa: BLE001 - classify: frozen store host, or gone
                if self._stop.is_set():
                    return
                if time.monotonic() - started >= 0.9 * self.watchdog_s:
                    self._lost(self._frozen_store_reason(), publish=False)
                else:
                    # Rank 0 exited (normally or not): if it failed, the launcher and the failing
                    # collectives report it; nothing left to watch.
                    log.info("watchdog on rank %d stops: store unreachable (%s)", self.env.rank, _first_line(e))
                    self._stop.set()
                return
            self._alive = now = time.monotonic()
            if abort:
                self._lost(abort[0].decode(), publish=False)
                return
            for r, raw in zip(watched, beats):
                text = raw.decode()
                if text != last.get(r):
                    last[r], changed[r] = text, now
                elif now - changed[r] > self.watchdog_s and not self._exited(r):
                    peer_step = (text.split() + ["?", "?"])[1]
                    self._lost(
                        f"rank {r} ({self._host(r)}) sent no heartbeat for {now - changed[r]:.0f}s "
                        f"(watchdog_s={self.watchdog_s:g}): it is frozen (e.g. SIGSTOP) or dead; "
                        f"its last heartbeat was at step {peer_step}, rank {self.env.rank} is at step {self.step}",
                        publish=True,
                    )
                    return

    def _guard_run(self) -> None:
        """A store call that never returns (TCPStore's `check`/`set` wait without a timeout)
        means the store's host, rank 0, is frozen: end the job from here."""
        limit = self.watchdog_s + 2 * self.heartbeat_s
        while not self._stop.wait(self.heartbeat_s):
            if time.monotonic() - self._alive > limit:
                self._lost(self._frozen_store_reason(), publish=False)
                return

    def _frozen_store_reason(self) -> str:
        return (
            f"rank 0 ({self._host(0)}) is frozen (e.g. SIGSTOP) or its node hangs: the store it hosts at "
            f"{self.env.master_addr}:{self.env.master_port} did not answer for {self.watchdog_s:g}s"
        )

    def _exited(self, rank: int) -> bool:
        return bool(self._store.check([f"exited/{rank}"]))

    def _host(self, rank: int) -> str:
        return self._hosts.get(rank, "host unknown")

    def _lost(self, reason: str, publish: bool) -> None:
        if self._lost_once.is_set():
            return
        self._lost_once.set()
        if publish:
            try:
                self._store.set("abort", reason)
                # Rank 0 hosts the store: stay up long enough for every rank to read the reason.
                time.sleep(2 * self.heartbeat_s)
            except Exception:  # noqa: BLE001 - still end this rank below
                pass
        self._on_lost(f"{self.env.describe()}: ending the job: {reason}")

    def diagnose(self, window_s: float | None = None) -> str:
        """One line about the peers for an error message, after watching their heartbeats for
        `window_s` (default 2.5 heartbeats): ranks that recorded a failure, ranks that stopped
        beating (killed or frozen), ranks that exited, and the step each one reached."""
        window_s = 2.5 * self.heartbeat_s if window_s is None else window_s
        others = [r for r in range(self.env.world_size) if r != self.env.rank]
        keys = [f"hb/{r}" for r in others]
        try:
            before = [b.decode() for b in self._store.multi_get(keys)] if keys else []
            time.sleep(window_s)
            after = [b.decode() for b in self._store.multi_get(keys)] if keys else []
            failed = {r: self._store.get(f"failed/{r}").decode() for r in others if self._store.check([f"failed/{r}"])}
            exited = [r for r in others if r not in failed and self._exited(r)]
        except Exception as e:  # noqa: BLE001 - the store lives in rank 0's process
            return f"rank 0 ({self._host(0)}) is gone: its store at {self.env.master_addr}:{self.env.master_port} is unreachable ({_first_line(e)})"
        parts = [f"rank {r} ({self._host(r)}) failed: {why}" for r, why in failed.items()]
        silent = [r for r, b, a in zip(others, before, after) if a == b and r not in failed and r not in exited]
        if silent:
            parts.append(
                f"rank(s) {_ranks_text(silent)} sent no heartbeat for {window_s:.1f}s (killed or frozen; "
                + ", ".join(f"rank {r} on {self._host(r)}" for r in silent[:4])
                + ")"
            )
        if exited:
            parts.append(f"rank(s) {_ranks_text(exited)} exited")
        steps = {r: (a.split() + ["?", "?"])[1] for r, a in zip(others, after)}
        parts.append("last steps: " + ", ".join(f"rank {r}={steps[r]}" for r in others[:16]) + f", this rank={self.step}")
        return "; ".join(parts)


def _exit_peer_lost(message: str) -> None:
    _say(message)
    sys.stdout.flush()
    os._exit(EXIT_PEER_LOST)  # from a thread: the main thread may be blocked inside a collective


def _say(message: str) -> None:
    """An error line that reaches the job log whether or not logging is configured."""
    if logging.getLogger().handlers:
        log.error(message)
    else:
        print(f"[vilbert-ds] ERROR {message}", file=sys.stderr, flush=True)


def _bounded(fn: Callable[[], object], timeout_s: float) -> tuple[bool, object]:
    """Run `fn` on a daemon thread for at most `timeout_s`: (True, result), (False, exception)
    or (False, None) when it did not return in time (it is left blocked on its thread)."""
    out: list = []

    def call() -> None:
        try:
            out.append((True, fn()))
        except Exception as e:  # noqa: BLE001 - handed back to the caller
            out.append((False, e))

    t = threading.Thread(target=call, name="vilbert-ds-bounded", daemon=True)
    t.start()
    t.join(timeout_s)
    return out[0] if out else (False, None)


def start_watchdog(env: DistEnv, store, watchdog_s: float, heartbeat_s: float | None = None) -> PeerWatchdog:
    """Start the process's watchdog (init_distributed does this) and hook exit and errors."""
    global _watchdog
    stop_watchdog()
    _watchdog = PeerWatchdog(env, store, watchdog_s, heartbeat_s).start()
    atexit.register(stop_watchdog)
    _install_excepthook(env)
    return _watchdog


def stop_watchdog() -> None:
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop(exited=True)
        _watchdog = None


def current_watchdog() -> PeerWatchdog | None:
    return _watchdog


def report_step(step: int) -> None:
    """Tell the watchdog the step boundary this rank reached (shown when a peer is lost)."""
    if _watchdog is not None:
        _watchdog.step = int(step)


def _install_excepthook(env: DistEnv) -> None:
    """An uncaught error records `failed/<rank>` in the store (so peers can name the rank that
    failed first) and prints what the peers recorded, then the usual traceback."""
    previous = sys.excepthook
    if getattr(previous, "_vilbert_ds", False):
        return

    def hook(exc_type, exc, tb):
        wd = _watchdog
        if wd is not None:
            cause = f"{exc_type.__name__}: {_first_line(exc)}"
            window_s = min(2.5 * wd.heartbeat_s, DIAGNOSE_MAX_S)
            _say(f"{env.describe()} failed: {cause}; watching the peers' heartbeats for {window_s:.1f}s")

            def record_and_diagnose() -> str:
                wd._store.set(f"failed/{env.rank}", cause)
                # silent ranks over a few beats are the killed or frozen ones
                return wd.diagnose(window_s)

            # The launcher SIGTERMs the survivors as soon as one rank dies; the few seconds spent
            # naming that rank are worth delaying it (torchrun and SLURM wait 30 s by default
            # before SIGKILL). Bounded: with rank 0 frozen, store calls never return.
            handler = signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                ok, peers = _bounded(record_and_diagnose, window_s + 5)
            finally:
                signal.signal(signal.SIGTERM, handler)
            if not ok:
                peers = wd._frozen_store_reason() if peers is None else f"unknown ({_first_line(peers)})"
            _say(f"{env.describe()}: peers: {peers}")
            wd.stop(exited=False)
        previous(exc_type, exc, tb)

    hook._vilbert_ds = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _ranks_text(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:16])) + (f" and {len(ranks) - 16} more" if len(ranks) > 16 else "")


# ----------------------------------------------------------------------------------------------
# Launch glue: what the deepspeed pdsh runner must carry to the other nodes

# Variables (exact names or prefixes) that must be the same on every node of a hostfile launch.
NODE_ENV_PREFIXES = (
    "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "NCCL_", "GLOO_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_DEBUG",
    "WANDB_", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS",
    "VILBERT_DS_", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
)
# Never put on a command line that shows in `ps` on every node.
NODE_ENV_SECRETS = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|API_KEY)", re.I)


def node_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables of `environ` that a multi-node launch must reproduce on every node."""
    environ = os.environ if environ is None else environ
    return {
        k: v
        for k, v in sorted(environ.items())
        if k.startswith(NODE_ENV_PREFIXES) and not NODE_ENV_SECRETS.search(k) and "\n" not in v
    }


def write_hostfile_env(env_file: Path, environ: Mapping[str, str] | None = None, python: str | None = None) -> Path:
    """Write the deepspeed launcher's `.deepspeed_env` (KEY=VALUE lines it exports on every node)
    and, beside it, the `--venv_script` that puts this Python's bin directory first on PATH: over
    ssh PATH is the system's, another `ninja` would rebuild every op. Returns the script's path."""
    env_file = Path(env_file).resolve()
    env_file.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{k}={v}" for k, v in node_environment(environ).items()]
    env_file.write_text("".join(line + "\n" for line in lines))
    bin_dir = Path(python or sys.executable).parent
    venv = env_file.with_name(env_file.name + ".venv.sh")
    venv.write_text(
        "# generated by `python -m vilbert_ds.distributed hostfile-env`: sourced on every node\n"
        f'export PATH="{bin_dir}:$PATH"\n'
    )
    return venv


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vilbert_ds.distributed", description="launch helpers")
    sub = parser.add_subparsers(dest="action", required=True)
    h = sub.add_parser("hostfile-env", help="write .deepspeed_env + the venv script; print the script's path")
    h.add_argument("--env-file", default=".deepspeed_env", help="where the deepspeed launcher will read it (DS_ENV_FILE)")
    sub.add_parser("show", help="print this process's DistEnv")
    args = parser.parse_args(argv)
    if args.action == "hostfile-env":
        print(write_hostfile_env(Path(args.env_file)))
    else:
        print(DistEnv.from_env().describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
