"""The chunkwise retention form on flash-linear-attention's Triton kernel (``model.retention_kernel``).

``fla.ops.simple_gla.chunk_simple_gla`` with a constant per-head log decay ``g_gamma`` computes
``S_t = gamma S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t``: megaret's retention
(megaret/ops/retention.py) with ``scale=1`` (the layer scales the keys). ``g_gamma`` is the
caller's ``log_decay``, i.e. the decays of this rank's GLOBAL heads. Never use fla's
``chunk_retention``: it derives the decays from the local head count, wrong on TP ranks > 0.

Same contract as megaret.ops.retention's forms: q, k ``(B, T, H, Dk)``; v ``(B, T, H, Dv)``;
log_decay ``(H,)``; initial_state ``(B, H, Dk, Dv)`` or None; reset ``(B, T)`` bool or None;
returns ``(o (B, T, H, Dv) in q's dtype, final_state (B, H, Dk, Dv) fp32)``.

Document resets become fla's variable-length sequences: the batch is flattened to B=1 and a
sequence starts at every sample start and every reset (``cu_seqlens``). The carried state of
sample b enters only its first sequence (zeros there too if the sample starts with a reset,
zeros for the others), and its final state is that of its last sequence. Finding the
boundaries costs one host sync per call with resets. Inputs the kernel cannot take (fp64, fp32 on
CUDA, an empty sequence) run the torch chunk form instead, the reason logged once.

fla is imported only when this form runs (or `uses_fla` finds it for ``auto``).
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.distributed as dist
from torch import Tensor

from megaret.config.schema import ConfigError, RetentionKernel, check_choice
from megaret.ops.retention import _validate, _validate_reset, chunk_retention

__all__ = ["check_kernel", "chunk_retention_fla", "fla_available", "uses_fla"]

log = logging.getLogger("megaret.ops")


@functools.cache
def fla_available() -> bool:
    """Whether fla (fla-core) and triton can be imported (looked up, not imported)."""
    return all(importlib.util.find_spec(name) is not None for name in ("fla", "triton"))


@functools.cache
def _log_once(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.info(message)


def check_kernel(kernel: str) -> None:
    """Construction-time check of model.retention_kernel: ConfigError if fla is asked for and missing."""
    check_choice("model.retention_kernel", kernel, RetentionKernel)
    if kernel == "fla" and not fla_available():
        raise ConfigError("model.retention_kernel=fla but flash-linear-attention is not installed; "
                          "pip install 'megaret[gpu]' (fla-core) or set model.retention_kernel=torch")


def uses_fla(kernel: str, device: torch.device) -> bool:
    """Whether the chunk form runs on fla: `fla`, or `auto` on CUDA with fla installed (logged once)."""
    use = kernel == "fla" or (kernel == "auto" and device.type == "cuda" and fla_available())
    _log_once(f"model.retention_kernel={kernel}: the chunk form runs on {'fla' if use else 'torch'} "
              f"({device.type})")
    return use


def _unsupported(q: Tensor) -> str | None:
    if q.dtype == torch.float64:
        return "fp64 inputs (fla's kernels compute in fp32 at most)"
    if q.dtype == torch.float32 and q.is_cuda:
        # measured on an H100 (bench/gpu_check.sh, 2026-11-28): fla-core 0.6.0 under triton 3.6 failed
        # to compile chunk_simple_gla for fp32 inputs ("CompilationError: at 39:17"); bf16 ran
        return "fp32 inputs on CUDA (fla 0.6.0's kernel failed to compile for fp32 there; bf16 runs on fla)"
    if q.shape[1] == 0:
        return "an empty sequence"
    return None


_last_segments: tuple[Tensor, tuple[Tensor, Tensor, Tensor]] | None = None


def _segments(reset: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Variable-length sequences of the flattened batch from a (B, T) reset mask (one host sync;
    the layers of one forward share the mask, so the last one is remembered).

    Returns cu_seqlens (N+1,) (CPU, int64), source (N,): the sample whose carried state enters
    each sequence (B: none, zeros) and last (B,): the last sequence of each sample.
    """
    global _last_segments
    if _last_segments is not None and _last_segments[0] is reset:
        return _last_segments[1]
    r = reset.detach().cpu()  # (B, T)
    B, T = r.shape
    starts = r.clone()
    starts[:, 0] = True  # every sample starts a sequence
    begin = starts.reshape(-1).nonzero().squeeze(1)  # (N,) flat start positions
    cu_seqlens = torch.cat([begin, begin.new_tensor([B * T])])  # (N+1,)
    sample = begin // T  # (N,)
    carries = (begin % T == 0) & ~r[sample, 0]  # first sequence of a sample that does not reset at 0
    source = torch.where(carries, sample, torch.full_like(sample, B))  # (N,)
    last = torch.cat([sample[1:] != sample[:-1], torch.tensor([True])]).nonzero().squeeze(1)  # (B,)
    _last_segments = (reset, (cu_seqlens, source, last))
    return cu_seqlens, source, last


def chunk_retention_fla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    initial_state: Tensor | None = None,
    *,
    chunk_size: int = 64,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The chunk form on fla's kernel (its own chunk length: ``chunk_size`` serves the fallback)."""
    _validate(q, k, v, log_decay, initial_state, chunk_size=chunk_size)
    _validate_reset(reset, q)
    if (reason := _unsupported(q)) is not None:
        _log_once(f"model.retention_kernel=fla cannot take {reason}; the torch chunk form runs instead")
        return chunk_retention(q, k, v, log_decay, initial_state, chunk_size=chunk_size, reset=reset)
    from fla.ops.simple_gla import chunk_simple_gla

    g_gamma = log_decay.float()  # (H,)
    s0 = None if initial_state is None else initial_state.float()  # (B, H, Dk, Dv), the state is fp32
    if reset is None:
        return chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0, initial_state=s0,
                                output_final_state=True)
    B, T, H, Dk = q.shape
    cu_cpu, source, last = _segments(reset)
    if s0 is not None:  # one initial state per sequence: the sample's for its first, else zeros
        s0 = torch.cat([s0, s0.new_zeros(1, *s0.shape[1:])])[source.to(q.device)]  # (N, H, Dk, Dv)
    o, final = chunk_simple_gla(
        q.reshape(1, B * T, H, Dk), k.reshape(1, B * T, H, Dk), v.reshape(1, B * T, H, -1),
        g_gamma=g_gamma, scale=1.0, initial_state=s0, output_final_state=True,
        cu_seqlens=cu_cpu.to(q.device), cu_seqlens_cpu=cu_cpu,
    )  # o: (1, B*T, H, Dv); final: (N, H, Dk, Dv)
    return o.view(B, T, H, -1), final[last.to(q.device)]
