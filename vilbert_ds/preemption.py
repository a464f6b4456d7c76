"""Stop cleanly when the scheduler says so: every rank agrees on the same step boundary.

A signal (SIGUSR1 from `sbatch --signal=USR1@N` or `scancel --signal=USR1`, SIGTERM at preemption
or at the time limit) may reach only some ranks. The handler only records it; the training loop
calls `StopSignal.should_stop(step)` at every step boundary, which all-reduces the flag (MAX), so
every rank stops after the same step, saves one complete checkpoint, and exits. Under SLURM,
rank 0 then asks for a requeue (`finish_stop`), and the next run resumes automatically.

    stop = StopSignal()                      # before the loop, in the main thread
    for step ...:
        train_step()
        if stop.should_stop(step):           # collective: every rank, same steps
            save_checkpoint()                # complete, on every rank
            sys.exit(finish_stop(env, stop))  # requeues under SLURM; EXIT_STOPPED

SLURM gives a job SIGTERM at its time limit and SIGKILL `KillWait` seconds later (30 s by
default): without a warning signal a save still happens when one step plus the save fit in that.
"""
from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import time

import torch

from vilbert_ds.distributed import DistEnv, report_step

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")
# A run that stopped on a signal after saving: not a failure, not finished (EX_TEMPFAIL; the
# trainer's EXIT_PREEMPTED). Distinct from 0 (finished), 1 (error) and the watchdog's 76.
EXIT_STOPPED = 75


class StopSignal:
    """Records SIGUSR1/SIGTERM and turns them into one agreed stop step on all ranks.

    Install it in the main thread before training starts. Collective: `should_stop` must be
    called by every rank at the same steps (it returns False without communicating between
    `check_every` steps)."""

    def __init__(self, signals: tuple[str, ...] = DEFAULT_SIGNALS, check_every: int = 1):
        if int(check_every) < 1:
            raise ValueError(f"check_every={check_every} must be >= 1")
        self.received: str | None = None  # signal name, or "peer" when another rank got it
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self.stop_step: int | None = None  # the step boundary all ranks agreed to stop at
        self.check_every = int(check_every)
        self._previous: dict[signal.Signals, object] = {}
        for name in signals:
            sig = getattr(signal, name, None)
            if sig is None:
                raise ValueError(f"unknown signal {name!r}")
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        # Async-signal context: only record. Logging here could deadlock on the logging lock.
        if self.received is None:
            self.received = signal.Signals(signum).name
            self.received_at = time.monotonic()

    def restore(self) -> None:
        """Give the signals back to the handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def local(self) -> bool:
        """This rank itself received a signal (not only a peer)."""
        return self.received is not None and self.received != "peer"

    def should_stop(self, step: int | None = None) -> bool:
        """True on every rank once any rank got a signal. Collective (see the class docstring).

        `step` is the step boundary just reached; it is also reported to the peer watchdog, so
        a frozen rank can be shown next to the step the others reached."""
        if step is not None:
            report_step(step)
            if step % self.check_every:
                return False
        if self.stop_step is not None:
            return True
        flag = 1 if self.received is not None else 0
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([flag], dtype=torch.int32, device=_collective_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
            if flag and self.received is None:
                self.received = "peer"
                self.received_at = time.monotonic()
        if flag:
            self.stop_step = step
            log.warning(
                "stopping at step %s: %s", step, "signal from another rank" if self.received == "peer" else self.received
            )
        return bool(flag)


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def requeue_slurm_job(job_id: str | None, scontrol: str = "scontrol", timeout_s: float = 60.0) -> bool:
    """Ask SLURM to requeue job `job_id` (submit with --requeue). Returns whether it accepted.

    SLURM then ends the running job (its steps get SIGTERM: call this after the checkpoint is
    complete) and starts it again with SLURM_RESTART_COUNT + 1."""
    if not job_id:
        return False
    exe = shutil.which(scontrol) or scontrol
    try:
        subprocess.run([exe, "requeue", str(job_id)], check=True, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", None) or str(e)).strip()
        log.error("scontrol requeue %s failed: %s", job_id, detail)
        return False
    log.warning("requeued SLURM job %s", job_id)
    return True


def finish_stop(env: DistEnv, stop: StopSignal) -> int:
    """After all ranks saved at the agreed stop step: requeue (rank 0, under SLURM) and return
    the exit status for the process, `EXIT_STOPPED`.

    Call it after the checkpoint save returned on every rank (DeepSpeed's save ends in a
    barrier): the requeue ends the job's processes."""
    log.warning(
        "%s: stopped at step %s on %s; checkpoint saved", env.describe(), stop.stop_step, stop.received or "request"
    )
    if env.is_main and env.slurm_job_id:
        requeue_slurm_job(env.slurm_job_id)
    return EXIT_STOPPED
