"""DistEnv.from_env() for every launcher's variables, SLURM host lists, ports, and the errors
that name the variable at fault. Pure functions: no processes."""
from __future__ import annotations

import pytest

from vilbert_ds.distributed import (
    DEFAULT_PORT_BASE,
    DEFAULT_PORT_SPAN,
    DistEnv,
    DistEnvError,
    expand_nodelist,
    expand_tasks_per_node,
    port_for_job,
)


def test_single_process_without_launcher():
    env = DistEnv.from_env({})
    assert (env.rank, env.world_size, env.launcher, env.distributed, env.is_main) == (0, 1, "single", False, True)
    assert env.slurm_job_id is None and env.restart_count == 0


def test_torchrun():
    env = DistEnv.from_env(
        {
            "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
            "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29411",
            "TORCHELASTIC_RUN_ID": "run9", "TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_USE_AGENT_STORE": "True",
        }
    )
    assert env.launcher == "torchrun"
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.node_rank, env.num_nodes, env.master_addr, env.master_port) == (1, 2, "10.0.0.7", 29411)
    assert (env.restart_count, env.job_id, env.use_agent_store) == (2, "run9", True)


def test_torchrun_inside_slurm_is_torchrun_and_remembers_the_slurm_job():
    env = DistEnv.from_env(
        {
            "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
            "TORCHELASTIC_RUN_ID": "x", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0",
            "SLURM_JOB_ID": "55", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
        }
    )
    assert (env.launcher, env.rank, env.slurm_job_id) == ("torchrun", 1, "55")


def test_deepspeed_launcher_multi_node():
    env = DistEnv.from_env(
        {
            "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4", "CROSS_RANK": "1",
            "CROSS_SIZE": "2", "MASTER_ADDR": "h1", "MASTER_PORT": "29500",
        }
    )
    assert env.launcher == "deepspeed"
    assert (env.rank, env.local_rank, env.local_world_size, env.node_rank, env.num_nodes) == (5, 1, 4, 1, 2)


def test_deepspeed_launcher_inside_a_slurm_batch_script():
    # The batch shell has SLURM_PROCID=0 / SLURM_NTASKS; RANK from the launcher must win.
    env = DistEnv.from_env(
        {
            "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "0",
            "CROSS_SIZE": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "77",
        }
    )
    assert (env.launcher, env.rank, env.world_size, env.slurm_job_id) == ("deepspeed", 1, 2, "77")


def test_one_task_batch_script_is_a_single_process():
    env = DistEnv.from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "9", "SLURM_NODELIST": "n1"})
    assert (env.launcher, env.world_size, env.slurm_job_id, env.master_addr) == ("slurm", 1, "9", "n1")


def test_explicit_rank_variables():
    env = DistEnv.from_env({"RANK": "1", "WORLD_SIZE": "3", "MASTER_PORT": "1000"})
    assert (env.launcher, env.rank, env.local_rank, env.local_world_size, env.num_nodes) == ("env", 1, 1, 3, 1)


SRUN = {
    "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
    "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_JOB_NODELIST": "n[1-3]",
    "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "42",
    "SLURM_RESTART_COUNT": "1", "SLURMD_NODENAME": "n2",
}


def test_srun():
    env = DistEnv.from_env(SRUN)
    assert env.launcher == "slurm"
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.node_rank, env.num_nodes, env.host) == (1, 2, "n2")
    # rank 0 lives on the first node of the step (not of the allocation); port from the job id
    assert (env.master_addr, env.master_port) == ("n1", port_for_job("42"))
    assert (env.restart_count, env.job_id, env.slurm_job_id) == (1, "42", "42")
    assert "rank 3/4" in env.describe() and "host n2" in env.describe() and "restart 1" in env.describe()


def test_srun_uneven_tasks_per_node_and_explicit_master():
    env = DistEnv.from_env(
        dict(SRUN, SLURM_PROCID="3", SLURM_LOCALID="0", SLURM_STEP_TASKS_PER_NODE="3,1",
             MASTER_ADDR="10.1.1.1", MASTER_PORT="23456")
    )
    assert (env.local_world_size, env.master_addr, env.master_port) == (1, "10.1.1.1", 23456)


def test_srun_after_export_reads_the_same():
    env = DistEnv.from_env(SRUN)
    environ = dict(SRUN)
    env.export(environ)
    assert environ["RANK"] == "3" and environ["MASTER_ADDR"] == "n1"
    assert DistEnv.from_env(environ) == env


def test_export_roundtrip_torchrun():
    env = DistEnv(rank=2, world_size=4, local_rank=0, local_world_size=2, node_rank=1, num_nodes=2,
                  master_addr="h", master_port=1234, launcher="torchrun")
    environ: dict = {"TORCHELASTIC_RUN_ID": "r", "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2"}
    env.export(environ)
    back = DistEnv.from_env(environ)
    assert (back.rank, back.world_size, back.local_rank, back.node_rank, back.master_port) == (2, 4, 0, 1, 1234)


def test_mpi():
    env = DistEnv.from_env(
        {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
         "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "h0"}
    )
    assert (env.launcher, env.rank, env.node_rank, env.num_nodes, env.master_addr) == ("mpi", 2, 1, 2, "h0")
    env = DistEnv.from_env({"PMI_RANK": "1", "PMI_SIZE": "2"})
    assert (env.launcher, env.rank, env.world_size, env.master_addr) == ("mpi", 1, 2, "127.0.0.1")


def test_mpi_across_nodes_needs_master_addr():
    with pytest.raises(DistEnvError, match="MASTER_ADDR"):
        DistEnv.from_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})


@pytest.mark.parametrize(
    "environ, match",
    [
        ({"RANK": "0"}, "WORLD_SIZE is not"),
        ({"RANK": "zero", "WORLD_SIZE": "2"}, "RANK='zero' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 outside world size 2"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "MASTER_PORT 70000"),
        (dict(SRUN, SLURM_STEP_NODELIST="n[1-2"), "unbalanced brackets"),
        (dict(SRUN, SLURM_STEP_TASKS_PER_NODE="2(x"), "cannot parse"),
        (dict(SRUN, SLURM_RESTART_COUNT="-1"), "negative"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "9"}, "start the ranks with `srun"),
    ],
)
def test_bad_environments_name_the_variable(environ, match):
    with pytest.raises(DistEnvError, match=match):
        DistEnv.from_env(environ)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node7", ["node7"]),
        ("gpu[01-03,07],cpu1", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu1"]),
        ("a[9-11]", ["a9", "a10", "a11"]),
        ("a[098-101]", ["a098", "a099", "a100", "a101"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("x-[1-2].dom,y", ["x-1.dom", "x-2.dom", "y"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]


def test_port_for_job_is_stable_distinct_and_below_ephemeral_ports():
    ports = {port_for_job(str(j)) for j in range(1000, 1200)}
    assert len(ports) > 190  # collisions between neighbouring job ids are rare
    assert all(DEFAULT_PORT_BASE <= p < DEFAULT_PORT_BASE + DEFAULT_PORT_SPAN < 32768 for p in ports)
    assert port_for_job("1234") == port_for_job("1234")
