"""Retention over a sequence split across context-parallel ranks (LASP-2 style, exact).

CP rank r holds the contiguous slice r of every sample. Retention's transition over a stretch
of L tokens is the scalar gamma^L per head, so a slice is summarised by two numbers per head:

    F_r  (B, H, Dk, Dv)  its final state when it starts from zero
    a_r  (B, H)          gamma^L, or 0 when a document starts inside the slice (the chain is cut)

One all-gather of (F, a) gives every rank every summary; rank r's true initial state is the
prefix combination S_in_r = sum_{j<r} (prod_{j<i<r} a_i) F_j, and its outputs gain
gamma^(t+1) q_t S_in_r at the positions before its first document start. The message is
H*Dk*Dv (+H) per sample per layer, independent of T. The backward is the mirror: one all-gather
of the gradients of the combined states, then the suffix combination
dF_j = sum_{r>j} (prod_{j<i<r} a_i) dS_in_r (+ the final state's share).

A carried state (stateful training) enters at CP rank 0 (its slice runs from it, so F_0 holds
it); every rank returns the sequence's final state (the same on all ranks), which the next
call hands back to rank 0. The slice itself runs on whatever chunk form the layer chose
(megaret.ops.retention's torch form or fla's kernel: both take initial_state and return the
final state).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from megaret.parallel.context import ContextParallel

__all__ = ["context_parallel_retention", "summary_bytes"]

ChunkForm = Callable[..., tuple[Tensor, Tensor]]


def _all_gather(flat: Tensor, cp: ContextParallel) -> Tensor:
    """(n,) on every rank -> (cp.size, n), row r from rank r."""
    rows = [torch.empty_like(flat) for _ in range(cp.size)]
    dist.all_gather(rows, flat.contiguous(), group=cp.group)
    return torch.stack(rows)


class _CombineSummaries(torch.autograd.Function):
    """(F_r, a_r) of this rank -> (S_in_r, the sequence's final state), through one all-gather."""

    @staticmethod
    def forward(ctx, final: Tensor, carry: Tensor, cp: ContextParallel) -> tuple[Tensor, Tensor]:
        # final: (B, H, Dk, Dv); carry: (B, H), no gradient (a function of the fixed decays)
        n = final.numel()
        packed = torch.cat([final.reshape(-1), carry.reshape(-1).to(final.dtype)])  # (n + B*H,)
        rows = _all_gather(packed, cp)  # (cp, n + B*H)
        finals = rows[:, :n].view(cp.size, *final.shape)  # (cp, B, H, Dk, Dv)
        carries = rows[:, n:].view(cp.size, *carry.shape, 1, 1)  # (cp, B, H, 1, 1)
        state = torch.zeros_like(final)
        state_in = state
        for j in range(cp.size):
            if j == cp.rank:
                state_in = state
            state = carries[j] * state + finals[j]  # the true final state of slice j
        ctx.cp = cp
        ctx.save_for_backward(carries)
        return state_in, state

    @staticmethod
    def backward(ctx, grad_in: Tensor, grad_final: Tensor):
        cp: ContextParallel = ctx.cp
        (carries,) = ctx.saved_tensors
        n = grad_in.numel()
        rows = _all_gather(torch.cat([grad_in.reshape(-1), grad_final.reshape(-1)]), cp)  # (cp, 2n)
        g_in = rows[:, :n].view(cp.size, *grad_in.shape)  # (cp, B, H, Dk, Dv): dL/dS_in_r of each rank
        # U = dL/d(state after slice j); after the last slice it is the final state's gradient,
        # summed over the ranks (each returned it)
        u = rows[:, n:].view(cp.size, *grad_in.shape).sum(0)
        grad_final_own = u
        for j in range(cp.size - 1, cp.rank - 1, -1):
            if j == cp.rank:
                grad_final_own = u  # dL/dF_rank = dL/d(state after slice rank)
            u = g_in[j] + carries[j] * u
        return grad_final_own, None, None


def context_parallel_retention(
    chunk: ChunkForm,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    initial_state: Tensor | None,
    cp: ContextParallel,
    *,
    chunk_size: int,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Retention of this rank's slice of a sequence split over `cp`, exactly as one rank would.

    q, k: (B, T_r, H, Dk), v: (B, T_r, H, Dv), reset (B, T_r) bool or None: this rank's slice;
    initial_state (B, H, Dk, Dv) or None: the carried state (used on CP rank 0 only).
    Returns (o (B, T_r, H, Dv) in q's dtype, the whole sequence's final state (B, H, Dk, Dv)).
    """
    s0 = initial_state if cp.rank == 0 else None
    o, final = chunk(q, k, v, log_decay, s0, chunk_size=chunk_size, reset=reset)  # from zero (or S_0)
    cdt = final.dtype  # fp32 (fp64 for fp64 inputs)
    T = q.shape[1]
    lg = log_decay.to(cdt)  # (H,)
    carry = torch.exp(T * lg).expand(q.shape[0], -1)  # (B, H): gamma^T_r
    if reset is not None:
        carry = carry * (~reset.any(1)).to(cdt)[:, None]  # a document start cuts the chain
    state_in, state_final = _CombineSummaries.apply(final, carry.detach(), cp)
    # the earlier slices' contribution: gamma^(t+1) q_t S_in before the first document start
    xi = torch.exp((torch.arange(T, device=q.device, dtype=cdt) + 1)[:, None] * lg)  # (T, H)
    inter = torch.einsum("bthd,bhde->bthe", q.to(cdt), state_in) * xi[None, :, :, None]  # (B, T, H, Dv)
    if reset is not None:
        inter = inter * (reset.long().cumsum(1) == 0).to(cdt)[:, :, None, None]
    return (o.to(cdt) + inter).to(o.dtype), state_final


def summary_bytes(batch: int, local_heads: int, key_dim: int, value_dim: int, cp_size: int,
                  element_size: int = 4) -> int:
    """Bytes one rank receives in the forward all-gather of one layer: (cp - 1) summaries of
    B*H*(Dk*Dv + 1) values (the backward's all-gather moves as much again, twice the state)."""
    return (cp_size - 1) * batch * local_heads * (key_dim * value_dim + 1) * element_size
