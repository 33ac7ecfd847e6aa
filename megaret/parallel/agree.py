"""Work that one rank does while the others wait: make its failure every rank's failure.

When rank 0 alone writes run.dir (or picks a checkpoint) and fails, the other ranks must not go
on into the next collective and wait there until `train.collective_timeout_s`. `agree_or_raise`
runs the work, then the ranks exchange whether it failed: the failing rank raises its own error,
every other rank a :class:`PeerFailed` quoting it (a UserError when the peer's was one), so each
rank's log has one line naming the problem and the fix, and the job ends at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from megaret.errors import UserError

T = TypeVar("T")


class PeerFailed(RuntimeError):
    """Another rank failed at a point where every rank stops together (its message quoted)."""


class PeerUserError(PeerFailed, UserError):
    """Another rank stopped on a user error (one line on this rank too)."""


def agree_or_raise(ctx: Any, fn: Callable[[], T], *, everywhere: bool = False) -> T | None:
    """``fn()`` on rank 0 (on every rank with ``everywhere=True``); if it raised on any rank, every
    rank raises. Collective: every rank of ``ctx`` calls it at the same point. Returns fn's result
    where it ran, else None."""
    result, error = None, None
    if everywhere or ctx.rank == 0:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = exc
    if ctx.world_size > 1:
        mine = None if error is None else (isinstance(error, UserError),
                                           " ".join(str(error).split()) or type(error).__name__)
        failures: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(failures, mine)
        if error is None:
            for rank, failure in enumerate(failures):
                if failure is not None:
                    user, msg = failure
                    raise (PeerUserError if user else PeerFailed)(f"rank {rank} failed: {msg}")
    if error is not None:
        raise error
    return result
