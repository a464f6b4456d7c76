"""Stop cleanly when the scheduler says so: every rank agrees on the same step boundary.

A signal (SIGUSR1 from `sbatch --signal`, `scancel --signal=USR1`, or SIGTERM at preemption/time
limit) may reach only some ranks. The handler only sets a flag; `StopSignal.should_stop()` is
called by the training loop at each step boundary and all-reduces the flag (MAX), so all ranks stop
after the same step, save one complete checkpoint, and exit. The caller then asks SLURM to requeue
the job (`requeue_slurm_job`), and the next run resumes automatically.
"""
from __future__ import annotations

import logging
import signal
import subprocess
import time

import torch

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")


class StopSignal:
    def __init__(self, signals: tuple[str, ...] = DEFAULT_SIGNALS, check_every: int = 1):
        self.received: str | None = None
        self.received_at: float | None = None
        self.check_every = max(1, int(check_every))
        self._previous = {}
        for name in signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            self.received_at = time.monotonic()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def local(self) -> bool:
        return self.received is not None

    def should_stop(self, step: int | None = None) -> bool:
        """True on every rank once any rank got a signal. Collective: all ranks must call it at
        the same steps (it is skipped, returning False, between `check_every` steps)."""
        if step is not None and step % self.check_every:
            return False
        flag = 1 if self.received is not None else 0
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([flag], dtype=torch.int32, device=_collective_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
            if flag and self.received is None:
                self.received = "peer"
        return bool(flag)


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def requeue_slurm_job(job_id: str | None) -> bool:
    """Ask SLURM to requeue this job (it must have been submitted with --requeue)."""
    if not job_id:
        return False
    try:
        subprocess.run(["scontrol", "requeue", str(job_id)], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.error("scontrol requeue %s failed: %s", job_id, detail.strip())
        return False
    log.warning("requeued SLURM job %s", job_id)
    return True
