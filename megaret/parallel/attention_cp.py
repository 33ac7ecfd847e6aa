"""Attention over a sequence split across context-parallel ranks: Ulysses all-to-all (exact).

CP rank r holds the contiguous slice r (T_r = T / cp tokens) of every sample, for all of its TP
rank's heads. One all-to-all per tensor trades sequence shards for head shards: afterwards rank r
holds the WHOLE sequence for heads [r * H / cp, (r + 1) * H / cp) of its TP rank's H, so the
attention itself runs unchanged (SDPA's causal / block-window paths, document masks, a carried
block cache) and is exactly one process's; a second all-to-all brings the outputs back to
sequence shards for the output projection.

Why Ulysses rather than ring attention: the attention kernels and every mask of megaret's three
attention forms run as they are (a ring needs its own blockwise online-softmax merge for each
mask kind, and balances causal work only with a zig-zag slice order the loader would have to
follow); each rank sends and receives 4 * B * T * d / (tp * cp) values per layer (q, k, v, o:
3/cp of one slice's activations each way), which falls with CP. Its limit: CP must divide the
TP rank's heads (spec refusal). A carried cache (the sliding-window arch's previous block)
stays head-sharded: the next call gives each CP rank the same heads again.

The all-to-all is its own adjoint (chunk j goes to rank j and comes back from it), so the
backward is the same exchange of the gradients.

The sliding-window arch needs less: a query sees its own block and the previous one, so a rank
whose slice holds whole blocks needs only the previous rank's last block (the halo).
`exchange_last_blocks` is one all-gather of every rank's last block (keys, values and which of
them belong to the document that goes on): rank r attends to rank r - 1's as if it were a carried
cache, and every rank keeps the last rank's as the cache carried to the next call (stateful
training), so all ranks return the same one. Its message is cp * 2 * B * H * W * D values per
layer, independent of T; the backward all-reduces the gathered blocks' gradients (rank r + 1's
reach rank r).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from megaret.parallel.context import ContextParallel

__all__ = ["exchange_last_blocks", "gather_sequence", "heads_to_sequence", "sequence_to_heads",
           "ulysses_bytes"]


class _AllToAll(torch.autograd.Function):
    """x (cp, ...): chunk j goes to CP rank j; chunk i of the result came from CP rank i."""

    @staticmethod
    def forward(ctx, x: Tensor, cp: ContextParallel) -> Tensor:
        ctx.cp = cp
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=cp.group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllToAll.apply(grad.contiguous(), ctx.cp), None


def sequence_to_heads(x: Tensor, cp: ContextParallel) -> Tensor:
    """(B, H, T_r, D) this rank's slice, all heads -> (B, H / cp, T, D) the whole sequence of
    this rank's head group."""
    b, h, t, d = x.shape
    chunks = x.view(b, cp.size, h // cp.size, t, d).transpose(0, 1)  # (cp, B, H / cp, T_r, D): to rank j
    got = _AllToAll.apply(chunks.contiguous(), cp)  # (cp, B, H / cp, T_r, D): slice i from rank i
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // cp.size, cp.size * t, d)


def heads_to_sequence(x: Tensor, cp: ContextParallel) -> Tensor:
    """The inverse: (B, H / cp, T, D) -> (B, H, T_r, D)."""
    b, h, t, d = x.shape
    chunks = x.view(b, h, cp.size, t // cp.size, d).permute(2, 0, 1, 3, 4)  # (cp, B, H / cp, T_r, D)
    got = _AllToAll.apply(chunks.contiguous(), cp)  # (cp, B, H / cp, T_r, D): head group j from rank j
    return got.transpose(0, 1).reshape(b, cp.size * h, t // cp.size, d)


def _gather_rows(x: Tensor, cp: ContextParallel) -> Tensor:
    """x (...) on every CP rank -> (cp, ...), row r from rank r (no gradient)."""
    rows = [torch.empty_like(x) for _ in range(cp.size)]
    dist.all_gather(rows, x.contiguous(), group=cp.group)
    return torch.stack(rows)


class _GatherBlocks(torch.autograd.Function):
    """x (...) this rank's piece -> (cp, ...) every rank's, in rank order. The backward sums each
    piece's gradient over the ranks that used it (one all-reduce) and keeps this rank's."""

    @staticmethod
    def forward(ctx, x: Tensor, cp: ContextParallel) -> Tensor:
        ctx.cp = cp
        return _gather_rows(x, cp)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.cp.group)
        return grad[ctx.cp.rank], None


class _Bind(torch.autograd.Function):
    """y unchanged, with an autograd edge to x (whose gradient from here is zero): x's backward,
    a collective, then runs on every rank, also where y does not depend on x (CP rank 0)."""

    @staticmethod
    def forward(ctx, y: Tensor, x: Tensor) -> Tensor:
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, grad.new_zeros(ctx.x_shape, dtype=ctx.x_dtype)


Block = tuple[Tensor, Tensor, Tensor]  # keys, values (B, H, W, D) and valid (B, W) bool


def exchange_last_blocks(k: Tensor, v: Tensor, valid: Tensor, cp: ContextParallel
                         ) -> tuple[Block | None, Block, Callable[[Tensor], Tensor]]:
    """This rank's last block -> (rank - 1's, or None on rank 0; the last rank's; `bind`), through
    one all-gather. k, v: (B, H, W, D) rotated keys and values; valid: (B, W), True for the keys
    of the document that goes on past the block. Pass the attention's output through `bind`:
    the exchange's backward is a collective every CP rank must join, also rank 0, whose output
    does not depend on the halo."""
    b, h, w, d = k.shape
    n = b * h * w * d
    flat = torch.cat([k.reshape(-1), v.reshape(-1), valid.reshape(-1).to(k.dtype)])  # (2n + B*W,)
    rows = _GatherBlocks.apply(flat, cp)  # (cp, 2n + B*W): valid rides along as 0/1, exact in any dtype
    blocks = [(rows[r, :n].view(b, h, w, d), rows[r, n:2 * n].view(b, h, w, d),
               rows[r, 2 * n:].detach().view(b, w).bool()) for r in range(cp.size)]
    last = (blocks[-1][0].detach(), blocks[-1][1].detach(), blocks[-1][2])
    return (blocks[cp.rank - 1] if cp.rank else None), last, lambda y: _Bind.apply(y, rows)


def gather_sequence(x: Tensor, cp: ContextParallel) -> Tensor:
    """(B, T_r) per-token values of this rank's slice (no gradient: document starts) -> (B, T)."""
    return torch.cat(tuple(_gather_rows(x, cp)), dim=1)


def ulysses_bytes(batch: int, seq_length: int, hidden: int, tp: int, cp: int, element_size: int = 2) -> int:
    """Bytes one rank sends (and receives) in one layer's forward: q, k, v and o, each
    (cp - 1) / cp of its (B, T / cp, d / tp) slice (the backward moves as much again)."""
    return 4 * (cp - 1) * batch * (seq_length // cp) * (hidden // tp) // cp * element_size
