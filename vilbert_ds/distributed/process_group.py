"""Starting and ending torch.distributed with bounded waits.

`init_distributed(env, init_timeout_s=..., timeout_s=...)` starts torch.distributed with two
separate bounds: the rendezvous (every rank must show up within `init_timeout_s`) and every
later collective (`timeout_s`, also applied to the groups DeepSpeed creates later, which torch
would otherwise give its 30-minute default). It then starts the `PeerWatchdog` (watchdog.py).
End a run with `shutdown_distributed()` (barrier + destroy_process_group; without it gloo
rarely aborts at exit).
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
import sys

from .env import DistEnv, DistEnvError, hostname
from .watchdog import DEFAULT_WATCHDOG_S, first_line, ranks_text, start_watchdog, stop_watchdog

log = logging.getLogger("vilbert_ds.distributed")

# ----------------------------------------------------------------------------------------------
# Starting and ending torch.distributed

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
                f"{_missing_ranks(store, env)}; cause: {first_line(e)}"
            ) from e
        try:
            dist.init_process_group(
                backend, store=dist.PrefixStore("default_pg", store), rank=env.rank, world_size=env.world_size, timeout=timeout
            )
        except Exception as e:  # noqa: BLE001 - re-raised with the missing ranks named
            raise RuntimeError(
                f"{env.describe()}: process group setup failed within timeout_s={timeout_s:g}s: "
                f"{_missing_ranks(store, env)}; cause: {first_line(e)}"
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
        release_shm_allreduce_buffer()
    log.info("torch.distributed up: %s, backend %s, collective timeout %gs", env.describe(), backend, timeout_s)


# ----------------------------------------------------------------------------------------------
# DeepSpeed's shared-memory all-reduce segments

SHM_DIR = "/dev/shm"


def shm_allreduce_buffer(rank: int) -> str:
    """The shared-memory segment DeepSpeed's CPU communication op (`ShareMemCommBuilder`,
    csrc/cpu/comm/shm.cpp) creates for `rank` when every rank of the job is on one machine:
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, ~69 MB each."""
    # The C++ op builds the name from these variables as it finds them (DistEnv.export set them).
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return os.path.join(SHM_DIR, f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")


def release_shm_allreduce_buffer() -> bool:
    """Collective. Unlink this rank's DeepSpeed all-reduce segment from /dev/shm once every rank
    has mapped every other rank's (DeepSpeed never unlinks them: each run left world_size x 69 MB
    in /dev/shm, for good). The mappings stay valid until the processes exit, so the memory is
    returned however the run ends, SIGKILL included. Returns whether a segment was unlinked.
    Called wherever DeepSpeed's comm backend starts: after `deepspeed.init_distributed` here,
    and by `engine.build_engine` (deepspeed.initialize starts it when this module did not)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    rank, world = dist.get_rank(), dist.get_world_size()
    if world > 1:
        # DeepSpeed's shm_initialize returns only after mapping every peer's segment, and it
        # ran when DeepSpeed's comm backend started, before this barrier on every rank.
        dist.barrier()
    try:
        os.unlink(shm_allreduce_buffer(rank))
    except FileNotFoundError:
        return False
    return True


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
        raise RuntimeError(f"{env.describe()}: cannot reach the c10d store at {where}: {hint}; cause: {first_line(e)}") from e
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
        return f"the store at {env.master_addr}:{env.master_port} stopped answering ({first_line(e)})"
    if not missing:
        return "every rank joined the store, but the process group could not connect them"
    return f"rank(s) {ranks_text(missing)} never joined (store {env.master_addr}:{env.master_port})"


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
        forget_deepspeed_groups()


# DeepSpeed's module-level caches of groups split from the world (deepspeed.utils.groups)
_DS_GROUP_CACHES = ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                    "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS",
                    "_EXPERT_DATA_PARALLEL_GROUP", "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP")


def forget_deepspeed_groups() -> None:
    """After the world group is destroyed, drop what DeepSpeed cached from it: its comm backend
    (`deepspeed.comm.comm.cdb`) and the groups `deepspeed.utils.groups` split from the world.
    Otherwise the next engine built in the same process (a second evaluation or Predictor in a
    notebook, the next in-process test) broadcasts over a dead group ("Group ... is not
    registered"). Imports nothing: a process that never loaded DeepSpeed has nothing to forget."""
    import sys

    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None:
        comm.cdb = None
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name in _DS_GROUP_CACHES:
            value = getattr(groups, name, None)
            if isinstance(value, dict):
                value.clear()
            elif hasattr(groups, name):
                setattr(groups, name, None)


def _destroy_at_exit() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway; never turn an exit into a traceback
            pass
