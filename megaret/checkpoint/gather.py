"""Full-model tensors gathered from the live ranks (collective over TP and PP)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from megaret.checkpoint.merge import merge_tp, tp_dim


def gather_full(stages: list[nn.Module], ctx, value_of: Callable[[nn.Parameter], torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """value_of(param) for every parameter of the full model (TP shards merged along their
    partition dim, PP stages merged by global name), as fp32 CPU copies on every rank."""
    mine: dict[str, torch.Tensor] = {}
    for stage in stages:
        for name, p in stage.named_parameters():
            t = value_of(p).detach().float().clone()  # never alias the live tensors
            dim = tp_dim(p)
            if dim is not None and ctx.tp.size > 1:
                pieces = [torch.empty_like(t) for _ in range(ctx.tp.size)]
                dist.all_gather(pieces, t.contiguous(), group=ctx.tp.group)
                t = merge_tp(pieces, dim)
            mine[stage.global_name(name)] = t.cpu()
    if ctx.pp_size == 1:
        return mine
    stages: list[dict | None] = [None] * ctx.pp_size
    dist.all_gather_object(stages, mine, group=ctx.pp_group)
    return {k: v for stage in stages for k, v in stage.items()}


def full_parameters(stages: list[nn.Module], ctx) -> dict[str, torch.Tensor]:
    """Every parameter of the full model (TP shards merged, PP stages merged), on every rank."""
    return gather_full(stages, ctx, lambda p: p)
