"""The repository's own sbatch scripts, unchanged, on a real two-node SLURM cluster
(tests/fixtures/slurm.py): a job array builds shards; a 2-node ZeRO-2 pretraining job gets its
warning signal (SIGUSR1), saves, requeues itself and resumes; then its node crashes, SLURM
requeues it (--requeue) and it resumes from its last checkpoint; then it is preempted without a
warning (SIGTERM), saves, requeues itself and resumes; it finishes with every step once and every
sample once per epoch. (One job for all three stories: each SLURM run costs a full start-up.)

Event-driven: each signal or crash comes once the run logged the step the test waits for, and
every assertion holds whatever step it lands on (the job is 10 epochs long, so a signal cannot
arrive after its end on a fast machine; see TOTAL); time limits only end a test that would otherwise hang."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from fixtures.slurm import read_metrics
from vilbert_ds.trainer import read_sample_log

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]  # hard bound per test

REPO = Path(__file__).resolve().parents[1]
# steps of the pretraining job: 10 epochs of 24 (192 samples, 2 ranks x micro 4), checkpoints every 8. A quiet
# machine runs ~12 steps/s: with 2 epochs a run could finish between a logged step and the signal sent after it.
TOTAL = 240


def _job_env(inputs) -> dict[str, str]:
    return {"CONFIG": str(inputs.config), "DS_CONFIG": str(inputs.ds_config), "PYTHON": sys.executable,
            "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "VILBERT_DS_WATCHDOG_S": "30"}


def _wait_for_step(slurm, job_id: str, run_dir: Path, step: int, timeout_s: float = 180) -> int:
    """Wait until the run logged `step`; fails early when the job ended. Returns the last step."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = read_metrics(run_dir)
        if rows and max(rows) >= step:
            return max(rows)
        state = slurm.job(job_id).get("JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached step {step} ({slurm.job(job_id).get('JobState')}):\n"
                         + _job_log(run_dir.parent, job_id)[-4000:])


def _job_log(directory: Path, job_id: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(directory.glob(f"*-{job_id}*.out")))


def _assert_every_sample_once_per_epoch(run_dir: Path, steps: int, inputs) -> None:
    log = read_sample_log(run_dir)  # a step logged twice keeps the resumed run's keys
    assert sorted(log) == [0, 1]
    for rank, by_step in log.items():
        assert sorted(by_step) == list(range(1, steps + 1)), f"rank {rank}: steps {sorted(by_step)}"
    per_epoch = inputs.num_samples // (2 * inputs.micro)
    for epoch in range(steps // per_epoch):
        keys = [k for by_step in log.values() for s in range(epoch * per_epoch + 1, (epoch + 1) * per_epoch + 1)
                for k in by_step[s]]
        assert len(keys) == inputs.num_samples, epoch
        assert len(set(keys)) == len(keys), f"a sample was repeated in epoch {epoch}"


def _until(predicate, slurm, job: str, timeout_s: float, what: str, directory: Path) -> None:
    """Wait for `predicate()`; fails naming `what` when the job left the running states."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}:\n{_job_log(directory, job)[-4000:]}"
        assert slurm.job(job).get("JobState") in ("RUNNING", "PENDING", "REQUEUED", "CONFIGURING", "COMPLETING"), \
            f"{what}: {slurm.job(job)}\n{_job_log(directory, job)[-4000:]}"
        time.sleep(0.3)


def test_job_array_builds_the_same_shards_as_one_process(slurm, launch_inputs, tmp_path):
    out = tmp_path / "shards"
    env = dict(slurm.env, SLICES="2", PYTHON=sys.executable)
    ids = slurm.run(["bash", str(REPO / "slurm" / "shards.sh"), *launch_inputs.shard_args(out)], env=env,
                    cwd=tmp_path).stdout.split()
    array_id, manifest_id = ids
    tasks = slurm.wait_job(array_id, states=("COMPLETED", "FAILED", "CANCELLED"), timeout_s=120)
    assert len(tasks) == 2 and all(t["JobState"] == "COMPLETED" for t in tasks), tasks
    assert slurm.wait_job(manifest_id, timeout_s=60)[0]["JobState"] == "COMPLETED", _job_log(tmp_path, manifest_id)
    logs = "".join(p.read_text() for p in tmp_path.glob(f"vilbert-shards-{array_id}_*.out"))
    assert "slice 0 of 2" in logs and "slice 1 of 2" in logs
    built = json.loads((out / "manifest.json").read_text())
    reference = json.loads((launch_inputs.shards / "manifest.json").read_text())
    assert built["shards"] == reference["shards"]  # names, counts, checksums, offsets: byte-identical
    from vilbert_ds.cli import main as cli

    assert cli(["shards", "verify", str(out / "manifest.json")]) == 0


def test_two_node_zero2_job_survives_its_warning_signal_a_node_crash_and_a_preemption(slurm, launch_inputs, tmp_path):
    """One 2-node ZeRO-2 pretraining job, four runs: (0) gets its warning signal (SIGUSR1),
    every rank stops at the same step, saves, rank 0 requeues; (1) resumes right after that step,
    then once a checkpoint of its own is complete its batch node crashes (slurmd, slurmstepd and
    the rank, all SIGKILLed); SLURM notices, requeues it (--requeue) and the node comes back;
    (2) resumes from the last complete checkpoint, then is preempted without a warning
    (`scancel --signal=TERM`): every rank stops at the same step, saves, rank 0 requeues; (3)
    resumes right after that step and finishes. Every step once, every sample once per epoch."""
    run_dir = tmp_path / "run"
    job = slurm.sbatch(["--nodes=2", "--ntasks-per-node=1", "--job-name=pretrain",
                        str(REPO / "slurm" / "train.sbatch"),
                        # a loader worker per rank: SLURM's SIGTERM reaches it too (it must not end the rank)
                        *launch_inputs.overrides(run_dir, **{"train.total_steps": TOTAL, "data.num_workers": 1})],
                       env=_job_env(launch_inputs), cwd=tmp_path)
    _wait_for_step(slurm, job, run_dir, 3)
    # the warning SLURM sends before the time limit (--signal=USR1@N), delivered now
    slurm.run(["scancel", "--signal=USR1", job])

    def run_reached(restart: int, step: int) -> bool:
        return any(r["run/restart_count"] == restart and s >= step for s, r in read_metrics(run_dir).items())

    def last_step(restart: int) -> int:
        return max((s for s, r in read_metrics(run_dir).items() if r["run/restart_count"] == restart), default=0)

    _until(lambda: run_reached(1, 1), slurm, job, 180, "no resumed run after SIGUSR1", tmp_path)
    stop0 = last_step(0)
    # run 1: past its first checkpoint of its own (the next multiple of 8 after the stop, + 1)
    ckpt1 = (stop0 // 8 + 1) * 8
    _until(lambda: run_reached(1, ckpt1 + 1), slurm, job, 180, f"run 1 never passed step {ckpt1 + 1}", tmp_path)
    record = slurm.job(job)
    assert record["Restarts"] == "1" and record["NodeList"] == "n[1-2]", record
    batch_node = record["BatchHost"]
    killed = slurm.crash_node(batch_node)  # the node dies with the batch script, srun and rank 0
    assert len(killed) >= 3
    crashed_at = last_step(1)
    deadline = time.monotonic() + 90
    while slurm.job(job).get("Restarts") != "2":
        assert time.monotonic() < deadline, f"not requeued after the node crash: {slurm.job(job)}\n{slurm.debug_tail()}"
        time.sleep(0.5)
    slurm.start_node(batch_node)  # the node reboots; ReturnToService=2 takes it back
    # run 2: two steps past the checkpoint it resumed from, then preempted without a warning
    _until(lambda: run_reached(2, 1), slurm, job, 240, "no run after the node crash", tmp_path)
    resumed2 = min(s for s, r in read_metrics(run_dir).items() if r["run/restart_count"] == 2) - 1
    _until(lambda: run_reached(2, resumed2 + 2), slurm, job, 180, f"run 2 never reached {resumed2 + 2}", tmp_path)
    slurm.run(["scancel", "--signal=TERM", job])
    _until(lambda: run_reached(3, 1), slurm, job, 240, "no resumed run after SIGTERM", tmp_path)
    record = slurm.wait_job(job, timeout_s=300)[0]
    log = _job_log(tmp_path, job)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "3", f"{record}\n{log[-4000:]}"
    for restart in (0, 1, 2, 3):
        assert f"restart {restart}, 2 tasks on n[1-2]" in log, log[-4000:]
    assert "2 ranks (slurm)" in log and "ZeRO-2" in log

    rows = read_metrics(run_dir)  # a step logged twice keeps the later run's row
    assert sorted(rows) == list(range(1, TOTAL + 1)), sorted(rows)
    by_run = {n: [s for s, r in rows.items() if r["run/restart_count"] == n] for n in (0, 1, 2, 3)}
    assert 3 <= stop0 < TOTAL and by_run[0] == list(range(1, stop0 + 1))
    assert f"saving at step {stop0}" in log
    assert by_run[1] and by_run[1][0] == stop0 + 1, "run 1 continues right after the SIGUSR1 stop"
    # run 2 resumed from run 1's newest checkpoint complete at the crash, a multiple of 8
    assert resumed2 % 8 == 0 and ckpt1 <= resumed2 <= crashed_at, (resumed2, ckpt1, crashed_at)
    assert by_run[1] == list(range(stop0 + 1, resumed2 + 1))  # run 1's steps after it were redone
    stop2 = max(by_run[2])
    assert resumed2 + 2 <= stop2 < TOTAL and by_run[2] == list(range(resumed2 + 1, stop2 + 1))
    assert f"saving at step {stop2}" in log and "SIGTERM" in log
    assert by_run[3] == list(range(stop2 + 1, TOTAL + 1)), "run 3 continues right after the SIGTERM stop"
    _assert_every_sample_once_per_epoch(run_dir, TOTAL, launch_inputs)


def test_two_node_job_crosses_many_epoch_boundaries_with_loader_workers(slurm, launch_inputs, tmp_path):
    """The sbatch script with a loader worker per rank and 4-step epochs, run past several epoch
    boundaries (issue 12 item 5: a rank died of ENOMEM in fork() when the next epoch's worker
    started). Each rank keeps one worker process for the whole job and what it and its worker
    have committed stays flat (the loaders' epoch reports, VILBERT_DS_LOADER_REPORTS)."""
    run_dir, reports = tmp_path / "run", tmp_path / "reports"
    steps, per_epoch = 24, 4  # epoch_samples 32 = 2 ranks x micro-batch 4 x 4 steps
    job = slurm.sbatch(["--nodes=2", "--ntasks-per-node=1", "--job-name=epochs", str(REPO / "slurm" / "train.sbatch"),
                        *launch_inputs.overrides(run_dir, **{"data.num_workers": 1, "data.epoch_samples": 32,
                                                             "train.total_steps": steps, "train.save_every": 100})],
                       env=dict(_job_env(launch_inputs), VILBERT_DS_LOADER_REPORTS=str(reports)), cwd=tmp_path)
    record = slurm.wait_job(job, timeout_s=240)[0]
    log = _job_log(tmp_path, job)
    assert record["JobState"] == "COMPLETED", f"{record}\n{log[-4000:]}"
    assert sorted(read_metrics(run_dir)) == list(range(1, steps + 1))
    for rank in (0, 1):
        epochs = [json.loads(line) for line in (reports / f"train-rank{rank}.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in epochs] == list(range(steps // per_epoch - 1)), epochs
        assert len({tuple(sorted(r["workers"])) for r in epochs}) == 1 and len(epochs[0]["workers"]) == 1, epochs
        first = epochs[1]
        for r in epochs[1:]:
            assert r["committed"] <= first["committed"] + 256 * 2**20, [e["committed"] >> 20 for e in epochs]
            assert [*r["workers"].values()][0] <= [*first["workers"].values()][0] + 64 * 2**20, epochs


def test_sbatch_scripts_start_their_entry_points(slurm, tmp_path):
    """multitask / finetune / eval: submitted unchanged, srun starts the right module (asked for
    its --help, so no task data is needed) with the script's own arguments in front."""
    env = {"PYTHON": sys.executable, "DS_ACCELERATOR": "cpu"}
    script = {"multitask": "train", "finetune": "train", "eval": "eval"}  # train.sbatch runs $ENTRY
    jobs = {name: slurm.sbatch([str(REPO / "slurm" / f"{script[name]}.sbatch"), "--help"],
                               env=dict(env, ENTRY=name), cwd=tmp_path)
            for name in ("multitask", "finetune", "eval")}
    usage = {"multitask": "vilbert_ds.multitask", "finetune": "vilbert_ds.finetune", "eval": "vilbert_ds.evaluate"}
    for name, job in jobs.items():
        record = slurm.wait_job(job, timeout_s=120)[0]
        log = _job_log(tmp_path, job)
        assert record["JobState"] == "COMPLETED", f"{name}: {record}\n{log[-3000:]}"
        assert f"vilbert-ds {name}: job {job} restart 0, 1 tasks on" in log
        assert "usage:" in log and usage[name] in log, log[-3000:]
        assert record["Requeue"] == "1"
