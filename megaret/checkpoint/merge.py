"""Tensor-parallel shards: which dim a parameter is cut along, cutting, and merging.

Every full tensor of the model is built from its per-TP-rank pieces by `merge_tp`: the offline
consolidation of a checkpoint's model files (`megaret.checkpoint.consolidate`), the layout-free
training state for resharding (`megaret.checkpoint.reshard`) and the live gather over the TP
group (`megaret.checkpoint.gather`). `shard_of` is its inverse.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

from megaret.checkpoint.files import CheckpointError


def tp_dim(p: torch.Tensor) -> int | None:
    """The dim a tensor-parallel parameter is cut along across TP ranks; None when replicated."""
    return p.partition_dim if getattr(p, "tensor_model_parallel", False) else None


def merge_tp(pieces: Sequence[Any], dim: int | None) -> Any:
    """The full tensor from its pieces in TP-rank order, cut along `dim` (None: a replicated
    value, every rank holds all of it: the first piece)."""
    if dim is None or len(pieces) == 1:
        return pieces[0]
    return torch.cat(list(pieces), dim=dim)


def shard_of(full: torch.Tensor, dim: int | None, tp_size: int, tp_rank: int) -> torch.Tensor:
    """TP rank `tp_rank`'s piece of a full tensor cut along `dim` (None: replicated)."""
    if dim is None or tp_size == 1:
        return full
    return torch.chunk(full, tp_size, dim=dim)[tp_rank]


def merge_named(pieces: dict[Hashable, dict[int, Any]], dims: dict[Hashable, int | None], tp_size: int,
                where: Any) -> dict[Hashable, Any]:
    """{key: full value} from {key: {tp_rank: piece}}; a cut tensor needs every TP rank's piece."""
    out = {}
    for key, by_rank in pieces.items():
        dim = dims[key] if tp_size > 1 else None
        if dim is None:
            out[key] = by_rank[min(by_rank)]
            continue
        missing = set(range(tp_size)) - set(by_rank)
        if missing:
            name = key[0] if isinstance(key, tuple) else key
            raise CheckpointError(f"{where}: no TP rank {sorted(missing)} shard of {name}")
        out[key] = merge_tp([by_rank[r] for r in range(tp_size)], dim)
    return out
