"""Stopping a run cleanly on SLURM's warning signals and on Ctrl-C.

SLURM warns a job before its time limit or a preemption with a signal (`--signal=USR2@90`,
`scancel --signal=USR2`); `scontrol requeue` and preemption with PreemptMode=REQUEUE send
SIGTERM, then SIGKILL after KillWait seconds. `StopSignals` (entered by the trainer's entry point
before anything slow, so a signal during start-up is not lost) only records such a signal; at the
agreement points (before resuming, then before every step) the ranks all-reduce the flag so that
all of them stop at the same step, save a checkpoint (unless that step is saved already or nothing
was trained yet) and leave:

- USR1/USR2/TERM, for a requeue: the signal's previous Python handler (submitit's: on USR2 rank 0
  pickles the task and runs `scontrol requeue`, then exits) is called after the checkpoint is
  written; without one (plain srun / torchrun), rank 0 runs `scontrol requeue $SLURM_JOB_ID`
  itself for USR1/USR2 when inside a SLURM job (SIGTERM: SLURM is already requeueing or
  cancelling); then every rank raises `Preempted`, a SystemExit with status 75 (EX_TEMPFAIL:
  "try again"), so submitit writes no result and a restarted run resumes from the checkpoint.
- INT (Ctrl-C): the same checkpoint, no requeue, status 130. A second Ctrl-C stops at once
  (`StopNow`, a KeyboardInterrupt: status 130, no checkpoint); checkpoints already published are
  never touched by an unfinished save.

A SIGTERM whose KillWait runs out before the save is published loses nothing: the half-written
directory is never published, and the requeued job resumes from the last periodic checkpoint.
Tests slow or stall steps and start-up through :mod:`megaret.faults` (points ``before_step``,
``before_resume``).
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

from megaret.errors import EXIT_INTERRUPTED, EXIT_REQUEUE

log = logging.getLogger("megaret.train")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
#: when ranks caught different signals, the highest wins: Ctrl-C, then the warning signals, then TERM
_RANKING = {signal.SIGTERM: 1, signal.SIGUSR1: 2, signal.SIGUSR2: 3, signal.SIGINT: 4}


class Preempted(SystemExit):
    """The run stopped on a signal after saving a checkpoint (exit 75; 130 for SIGINT): run it
    again to resume."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_REQUEUE)
        self.signum, self.step = signum, step

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name} after step {self.step} (checkpoint saved)"


class StopNow(KeyboardInterrupt):
    """A second Ctrl-C: stop at once, without a checkpoint (exit 130)."""


class StopSignals:
    """Context manager: USR1/USR2/TERM/INT set a flag instead of acting at once (main thread
    only; re-entrant: nested `with` blocks of one instance install the handlers once). A signal
    ignored when it is entered (a background job's SIGINT) stays ignored."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self.received_at: float | None = None
        self.previous: dict[int, Any] = {}
        self._depth = 0

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise StopNow("second Ctrl-C: stopped at once without saving; the checkpoints already "
                          "published are intact and a new run resumes from the newest")
        if self.received is None or _RANKING[signum] > _RANKING.get(self.received, 0):
            self.received, self.received_at = signum, time.time()

    def __enter__(self) -> StopSignals:
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for s in self.signals:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self.previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth:
            return
        for s, h in self.previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self.previous = {}

    def agreed(self, device: Any) -> int | None:
        """The signal every rank acts on (collective: all ranks call it at the same point).

        Ranks may see a signal at different moments; the all-reduce makes them agree on the step.
        """
        import torch
        import torch.distributed as dist

        flag = torch.tensor([_RANKING.get(self.received, 0)], dtype=torch.int64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        back = {v: k for k, v in _RANKING.items()}
        return back.get(int(flag.item()))

    def leave(self, signum: int, rank: int, step: int) -> None:
        """After the checkpoint: let the previous handler requeue (or requeue here), then exit 75;
        for SIGINT just exit 130."""
        import torch.distributed as dist

        own = self.received if self.received is not None else signum  # what this rank was sent
        previous = self.previous.get(own)
        try:
            if signum == signal.SIGINT or own == signal.SIGINT:
                pass  # interrupted by hand: no requeue (Python's own SIGINT handler would raise)
            elif callable(previous):
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

