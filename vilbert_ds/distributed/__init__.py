"""Distributed runs: who am I (env.py), the process group (process_group.py), and the
heartbeat watchdog that names a frozen or dead rank (watchdog.py).

Import the public names from here: `from vilbert_ds.distributed import DistEnv, init_distributed`.
`python -m vilbert_ds.distributed hostfile-env | show` runs the launch helpers.
"""
from .env import (DEFAULT_MASTER_PORT, DEFAULT_PORT_BASE, DEFAULT_PORT_SPAN, LAUNCHERS, DistEnv, DistEnvError,
                  expand_nodelist, expand_tasks_per_node, hostname, node_environment, port_for_job, write_hostfile_env)
from .process_group import init_distributed, release_shm_allreduce_buffer, shutdown_distributed
from .watchdog import EXIT_PEER_LOST, PeerWatchdog, current_watchdog, report_step, start_watchdog, stop_watchdog

__all__ = [
    "DEFAULT_MASTER_PORT", "DEFAULT_PORT_BASE", "DEFAULT_PORT_SPAN", "EXIT_PEER_LOST", "LAUNCHERS", "DistEnv",
    "DistEnvError", "PeerWatchdog", "current_watchdog", "expand_nodelist", "expand_tasks_per_node", "hostname",
    "init_distributed", "node_environment", "port_for_job", "release_shm_allreduce_buffer", "report_step",
    "shutdown_distributed", "start_watchdog", "stop_watchdog", "write_hostfile_env",
]
