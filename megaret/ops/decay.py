"""Per-head decay schedules for multi-scale retention.

Each head h of a retention layer forgets at its own rate gamma_h in (0, 1); the ops take
``log_decay = log(gamma)`` of shape ``(H,)``. Under tensor parallelism a rank only holds a slice of
the heads, but the schedule is a function of the *global* head index, so every rank must ask for
its slice of the global vector (``head_offset`` / ``num_local_heads``) rather than build a shorter
schedule of its own.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from megaret.config.schema import DecaySchedule, choices
from megaret.ops.retention import check_log_decay

SCHEDULES: tuple[str, ...] = choices(DecaySchedule)


def _full_log_decay(num_heads: int, schedule: str) -> Tensor:
    """log(gamma) for all ``num_heads`` global heads, computed in float64."""
    h = torch.arange(num_heads, dtype=torch.float64)
    if schedule == "retnet":
        # gamma_h = 1 - 2^(-5-h) (RetNet reference code). log1p keeps full precision when
        # 2^(-5-h) is tiny, where log(1 - x) would round 1 - x first.
        return torch.log1p(-torch.exp2(-5.0 - h))
    if schedule == "loglinear":
        # gamma = 1 - exp(linspace(log(1/32), log(1/512), H)) (the paper's experiments).
        one_minus_gamma = torch.exp(
            torch.linspace(math.log(1 / 32), math.log(1 / 512), num_heads, dtype=torch.float64)
        )
        return torch.log1p(-one_minus_gamma)
    raise ValueError(f"unknown decay schedule {schedule!r}; valid schedules are {', '.join(SCHEDULES)}")


def retnet_log_decay(
    num_heads: int,
    head_offset: int = 0,
    num_local_heads: int | None = None,
    schedule: str = "retnet",
) -> Tensor:
    """Return log(gamma) (float32, shape ``(num_local_heads,)``) for global heads
    ``head_offset .. head_offset + num_local_heads - 1`` of a layer with ``num_heads`` heads.

    ``num_local_heads=None`` means all heads from ``head_offset`` to the end.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown decay schedule {schedule!r}; valid schedules are {', '.join(SCHEDULES)}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if not 0 <= head_offset < num_heads:
        raise ValueError(f"head_offset must be in [0, {num_heads}), got {head_offset}")
    if num_local_heads is None:
        num_local_heads = num_heads - head_offset
    if num_local_heads < 1 or head_offset + num_local_heads > num_heads:
        raise ValueError(
            f"heads [{head_offset}, {head_offset + num_local_heads}) do not fit in {num_heads} global heads"
        )
    full = _full_log_decay(num_heads, schedule)
    local = full[head_offset : head_offset + num_local_heads].to(torch.float32)
    check_log_decay(local)  # fp32 rounds a decay within 2^-150 of 1 to exactly 1: refused here, once
    return local
