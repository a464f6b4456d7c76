"""The one place that reads the distributed environment.

`DistEnv.from_env()` understands torchrun / the deepspeed launcher (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT), SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODELIST,
SLURM_JOB_ID) and MPI (OMPI_COMM_WORLD_*, PMI_*), and returns a frozen value. Nothing else in
vilbert-ds reads RANK or SLURM_* variables. `deepspeed.init_distributed` does not read SLURM
variables by itself; `init_distributed(env)` exports what torch.distributed needs first.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
import zlib
from dataclasses import dataclass
from typing import Mapping

DEFAULT_PORT_BASE = 20000  # SLURM jobs derive a port from their job id in [base, base + 20000)


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM hostlist syntax -> host names: 'gpu[01-03,07],cpu1' -> gpu01 gpu02 gpu03 gpu07 cpu1."""
    hosts: list[str] = []
    # split on commas that are not inside brackets
    parts, depth, cur = [], 0, ""
    for ch in nodelist:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    for part in parts:
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for rng in ranges.split(","):
            if "-" in rng:
                lo, hi = rng.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{rng}{suffix}")
    return hosts


def port_for_job(job_id: str, base: int = DEFAULT_PORT_BASE) -> int:
    """A rendezvous port that differs between jobs sharing a node, stable across a job's ranks
    and across its requeues."""
    return base + zlib.crc32(str(job_id).encode()) % 20000


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return default


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # torchrun | deepspeed | slurm | mpi | single
    restart_count: int = 0  # SLURM_RESTART_COUNT or TORCHELASTIC_RESTART_COUNT
    job_id: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "DistEnv":
        env = os.environ if env is None else env
        job_id = env.get("SLURM_JOB_ID") or env.get("TORCHELASTIC_RUN_ID") or None
        restart = _int(env, "SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT", default=0)
        if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, deepspeed launcher, or an explicit setup
            launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
            if "SLURM_PROCID" in env and env.get("RANK") == env.get("SLURM_PROCID") and "TORCHELASTIC_RUN_ID" not in env:
                launcher = "slurm"
            world = int(env["WORLD_SIZE"])
            local_world = _int(env, "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=None)
            if local_world is None:
                local_world = world
            return cls(
                rank=int(env["RANK"]),
                world_size=world,
                local_rank=_int(env, "LOCAL_RANK", default=0),
                local_world_size=local_world,
                node_rank=_int(env, "GROUP_RANK", "NODE_RANK", "SLURM_NODEID", default=int(env["RANK"]) // max(local_world, 1)),
                num_nodes=max(1, world // max(local_world, 1)),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", 29500)),
                launcher=launcher,
                restart_count=restart,
                job_id=job_id,
            )
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun, one task per GPU
            nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1")
            num_nodes = _int(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES", default=len(nodes))
            world = int(env["SLURM_NTASKS"])
            local_world = _local_tasks(env, world, num_nodes)
            return cls(
                rank=int(env["SLURM_PROCID"]),
                world_size=world,
                local_rank=_int(env, "SLURM_LOCALID", default=0),
                local_world_size=local_world,
                node_rank=_int(env, "SLURM_NODEID", default=0),
                num_nodes=num_nodes,
                master_addr=env.get("MASTER_ADDR") or nodes[0],
                master_port=int(env.get("MASTER_PORT") or port_for_job(job_id or "0")),
                launcher="slurm",
                restart_count=restart,
                job_id=job_id,
            )
        if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:  # mpirun
            rank = _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK")
            world = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
            local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", default=0)
            local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", default=world)
            return cls(
                rank=rank,
                world_size=world,
                local_rank=local_rank,
                local_world_size=local_world,
                node_rank=rank // max(local_world, 1),
                num_nodes=max(1, world // max(local_world, 1)),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", 29500)),
                launcher="mpi",
                restart_count=restart,
                job_id=job_id,
            )
        return cls(restart_count=restart, job_id=job_id)

    def export(self, environ: dict | None = None) -> None:
        """Write the torch.distributed variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
        environ = os.environ if environ is None else environ
        environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def _local_tasks(env: Mapping[str, str], world: int, num_nodes: int) -> int:
    per_node = env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE")
    if per_node:
        m = re.match(r"(\d+)", per_node)  # '4(x2)' -> 4
        if m:
            return int(m.group(1))
    return max(1, world // max(num_nodes, 1))


def init_distributed(
    env: DistEnv,
    backend: str | None = None,
    init_timeout_s: float = 300.0,
    timeout_s: float = 600.0,
) -> None:
    """Start torch.distributed through DeepSpeed for `env`.

    `init_timeout_s` bounds the rendezvous (all ranks must show up); `timeout_s` bounds every
    later collective, so a hung or dead rank ends the job instead of stalling it for torch's
    default 30 minutes.
    """
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    env.export()
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(seconds=max(init_timeout_s, timeout_s)),
        rank=env.rank,
        world_size=env.world_size,
    )
    # DeepSpeed takes one timeout for init and collectives; tighten the default group to the
    # training timeout now that everyone is here.
    if timeout_s < init_timeout_s and env.world_size > 1:
        try:
            from torch.distributed.distributed_c10d import _set_pg_timeout

            _set_pg_timeout(datetime.timedelta(seconds=timeout_s), None)
        except (ImportError, AttributeError, RuntimeError):
            pass


def hostname() -> str:
    return socket.gethostname()
