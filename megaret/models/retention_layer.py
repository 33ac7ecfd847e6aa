"""Multi-scale retention (MSR) on megatron-core tensor-parallel linears.

    Y = GroupNorm_h(Retention(X W_Q, X W_K, X W_V)),  MSR(X) = (swish(X W_G) * Y) W_O

X W_Q, X W_K, X W_V and X W_G are one column-parallel GEMM (`qkvg_proj`, rows grouped head by
head: megaret/models/fused.py), initialised exactly as the four separate projections were.
Each TP rank holds H / tp whole heads; their decays come from the GLOBAL head index, so a
TP=4 run computes exactly what a TP=1 run does. The chunk form runs on torch or on
flash-linear-attention's kernel as model.retention_kernel says (megaret/ops/retention_fla.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from torch import nn

from megaret.config.schema import RetentionKernel, RetentionMode, check_choice
from megaret.models.fused import qkvg_rows
from megaret.models.norms import head_norm
from megaret.models.parallel_linear import fused_column, row
from megaret.models.rotary import Rotary
from megaret.ops import (
    chunk_retention,
    parallel_retention,
    recurrent_retention,
    retention_step,
    retnet_log_decay,
)
from megaret.ops.retention_fla import check_kernel, chunk_retention_fla, uses_fla
from megaret.parallel.context import NO_CP, ContextParallel, TensorParallel
from megaret.parallel.retention_cp import context_parallel_retention


class MultiScaleRetention(nn.Module):
    def __init__(
        self,
        hidden: int,
        num_heads: int,
        value_factor: int,
        config: TransformerConfig,
        tp: TensorParallel,
        *,
        chunk_size: int,
        decay_schedule: str = "retnet",
        kernel: RetentionKernel = "auto",
        rotary_base: float = 10000.0,
        norm_eps: float = 1e-6,
        cp: ContextParallel = NO_CP,
    ) -> None:
        super().__init__()
        if num_heads % tp.size:
            raise ValueError(f"model.num_heads={num_heads} is not divisible by parallel.tensor={tp.size}")
        self.local_heads = num_heads // tp.size
        self.key_dim = hidden // num_heads
        self.value_dim = value_factor * hidden // num_heads
        self.chunk_size = chunk_size
        check_kernel(kernel)
        self.kernel = kernel  # model.retention_kernel: what runs the chunk form
        self.norm_eps = norm_eps
        self.cp = cp  # context parallel: this rank holds one slice of every sequence
        self.qkvg = qkvg_rows(hidden, num_heads, value_factor)  # per head: Dk, Dk, Dv, Dv rows
        self.qkvg_proj = fused_column(hidden, self.qkvg, config, tp)
        self.out_proj = row(value_factor * hidden, hidden, config, tp)
        self.rotary = Rotary(self.key_dim, rotary_base)
        log_decay = retnet_log_decay(
            num_heads, head_offset=tp.rank * self.local_heads, num_local_heads=self.local_heads,
            schedule=decay_schedule,
        )
        self.register_buffer("log_decay", log_decay, persistent=False)  # (H_local,)

    def forward(
        self,
        x: torch.Tensor,
        state: torch.Tensor | None = None,
        position: int = 0,
        mode: RetentionMode = "chunk",
        doc_start: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (T, B, d) ((T / tp, B, d) under sequence parallelism: the column-parallel
        projections gather T, the row-parallel output scatters it back); state: (B, H_local,
        Dk, Dv) or None -> ((T, B, d), new state). doc_start: (B, T) bool or None, True where
        a document starts: the retention state is zeroed just before it (packed samples).
        Rotary positions are not restarted there: retention with rotary depends only on
        relative positions inside a document, so the absolute offset changes nothing."""
        qkvg, _ = self.qkvg_proj(x)  # (T, B, H_local * (2 Dk + 2 Dv)), rows grouped head by head
        t, b = qkvg.shape[:2]  # the full T also under sequence parallelism (x is then a T / tp shard)
        q, k, v, gate = qkvg.view(t, b, self.local_heads, -1).split(self.qkvg.head_rows, dim=-1)
        q, k, v = (z.transpose(0, 1) for z in (q, k, v))  # (B, T, H, Dk), (B, T, H, Dk), (B, T, H, Dv)
        q = self.rotary(q, position)
        k = self.rotary(k, position) * self.key_dim**-0.5
        log_decay = self.log_decay.to(q.dtype) if q.dtype == torch.float64 else self.log_decay
        reset = doc_start
        if self.cp.size > 1:  # a slice of the sequence: the chosen form runs on it, the slices combine
            if mode == "recurrent":
                raise ValueError("retention_mode=recurrent (decoding) does not run under "
                                 "parallel.context_parallel > 1")
            chunk = chunk_retention_fla if uses_fla(self.kernel, q.device) else chunk_retention
            if mode == "parallel":
                chunk = lambda *a, chunk_size, reset: parallel_retention(*a, reset)  # noqa: E731
            o, new_state = context_parallel_retention(chunk, q, k, v, log_decay, state, self.cp,
                                                      chunk_size=self.chunk_size, reset=reset)
        elif mode == "parallel":
            o, new_state = parallel_retention(q, k, v, log_decay, state, reset)
        elif mode == "chunk":
            chunk = chunk_retention_fla if uses_fla(self.kernel, q.device) else chunk_retention
            o, new_state = chunk(q, k, v, log_decay, state, chunk_size=self.chunk_size, reset=reset)
        elif mode == "recurrent":
            if q.shape[1] == 1:  # one decoding step: O(1) in the context length
                o, new_state = retention_step(q[:, 0], k[:, 0], v[:, 0], log_decay, state,
                                              None if reset is None else reset[:, 0])
                o = o[:, None]
            else:
                o, new_state = recurrent_retention(q, k, v, log_decay, state, reset)
        else:
            check_choice("retention_mode", mode, RetentionMode)
        y = head_norm(o, self.norm_eps)  # (B, T, H, Dv)
        y = y.transpose(0, 1).reshape(t, b, self.local_heads * self.value_dim)  # (T, B, H*Dv)
        gate = gate.reshape(t, b, self.local_heads * self.value_dim)  # (T, B, H*Dv)
        out, _ = self.out_proj(F.silu(gate) * y.to(gate.dtype))  # (T, B, d), all-reduced
        return out, new_state
