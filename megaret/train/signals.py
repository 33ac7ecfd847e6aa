"""Stopping a run cleanly on SLURM's warning signals.

SLURM warns a job before its time limit or a preemption with a signal (`--signal=USR2@90`,
`scancel --signal=USR2`); `scontrol requeue` and preemption with PreemptMode=REQUEUE send
SIGTERM, then SIGKILL after KillWait seconds. `StopSignals` (installed by `Trainer.train`)
only records such a signal; after every step the ranks all-reduce the flag so that all of them
stop after the same step, save a checkpoint and leave for a requeue:

- the signal's previous Python handler (submitit's: on USR2 rank 0 pickles the task and runs
  `scontrol requeue`, then exits) is called after the checkpoint is written;
- without one (plain srun / torchrun), rank 0 runs `scontrol requeue $SLURM_JOB_ID` itself for
  USR1/USR2 when inside a SLURM job (SIGTERM: SLURM is already requeueing or cancelling);
- then every rank raises `Preempted`, a SystemExit with status 75 (EX_TEMPFAIL: "try again"),
  so submitit writes no result and a restarted run resumes from the checkpoint.

A SIGTERM whose KillWait runs out before the save is published loses nothing: the half-written
directory is never published, and the requeued job resumes from the last periodic checkpoint.
Tests slow or stall steps through :mod:`megaret.faults` (point ``before_step``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("megaret.train")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL


class Preempted(SystemExit):
    """The run stopped on a signal after saving a checkpoint; run it again to resume."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(PREEMPTED_EXIT)
        self.signum, self.step = signum, step

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name} after step {self.step} (checkpoint saved)"


class StopSignals:
    """Context manager: USR1/USR2/TERM set a flag instead of acting at once (main thread only)."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self.received_at: float | None = None
        self.previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None or signum != signal.SIGTERM:  # a warning signal outranks SIGTERM
            self.received, self.received_at = signum, time.time()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self.previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self.previous = {}

    def agreed(self, device: torch.device) -> int | None:
        """The signal every rank acts on (collective: all ranks call it after the same step).

        Ranks may see a signal at different moments; the all-reduce makes them agree on the step.
        """
        code = {signal.SIGTERM: 1, signal.SIGUSR1: 2, signal.SIGUSR2: 3}
        flag = torch.tensor([code.get(self.received, 0)], dtype=torch.int64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        back = {v: k for k, v in code.items()}
        return back.get(int(flag.item()))

    def leave(self, signum: int, rank: int, step: int) -> None:
        """After the checkpoint: let the previous handler requeue (or requeue here), then exit 75."""
        own = self.received if self.received is not None else signum  # what this rank was sent
        previous = self.previous.get(own)
        try:
            if callable(previous):
                previous(own, None)  # submitit's rank 0 requeues and raises SystemExit here
            elif rank == 0 and signum != signal.SIGTERM and os.environ.get("SLURM_JOB_ID"):
                requeue_slurm_job(os.environ["SLURM_JOB_ID"])
        finally:
            if dist.is_initialized() and dist.get_world_size() > 1:
                try:
                    dist.barrier()  # no rank leaves before rank 0 has requeued
                except RuntimeError:  # a peer already left
                    pass
        raise Preempted(signum, step)


def requeue_slurm_job(job_id: str) -> None:
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True,
                       timeout=60)
        log.warning("requeued SLURM job %s", job_id)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not requeue SLURM job %s: %s", job_id, exc)

