"""The one reader of the launcher's environment: `DistEnv.from_env()`.

Understands torchrun (RANK, LOCAL_RANK, GROUP_RANK, LOCAL_WORLD_SIZE, TORCHELASTIC_*), the
deepspeed launcher (RANK, LOCAL_RANK, CROSS_RANK, LOCAL_SIZE), SLURM's srun (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID, SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE,
SLURM_JOB_ID, SLURM_RESTART_COUNT) and MPI (OMPI_COMM_WORLD_*, PMI_*), and returns a frozen
value. Nothing else in vilbert-ds reads RANK or SLURM_* variables. Also the launch glue that
carries the environment to every node of a hostfile launch (`write_hostfile_env`).
"""
from __future__ import annotations

import os
import re
import socket
import sys
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

# SLURM jobs derive their rendezvous port from the job id, in [base, base + span). The range stays
# below Linux's ephemeral ports (32768-60999) so an outgoing connection never holds it.
DEFAULT_PORT_BASE = 15000
DEFAULT_PORT_SPAN = 15000
DEFAULT_MASTER_PORT = 29500

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
