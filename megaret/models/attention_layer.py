"""Causal self-attention on megatron-core tensor-parallel linears, with a KV/block cache.

q/k/v come from ColumnParallelLinear (each TP rank holds H / tp whole heads), the output
goes through RowParallelLinear (all-reduce). Positions are rotary. With `window` set the
attention is block-windowed (previous block + causal current block) and the cache keeps
only what the next token can still see; without it the cache keeps every key (decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer import TransformerConfig
from torch import nn

from megaret.models.parallel_linear import column, row
from megaret.models.rotary import Rotary
from megaret.ops.attention import blockwise_window_attention, cached_attention, trim_cache
from megaret.parallel.context import TensorParallel


@dataclass
class KVCache:
    """Keys (rotated) and values of the tokens before the next call, with per-sample validity."""

    k: torch.Tensor  # (B, H_local, L, D)
    v: torch.Tensor  # (B, H_local, L, D)
    valid: torch.Tensor  # (B, L) bool: False for history a sample has dropped (document start)

    def detach(self) -> KVCache:
        return KVCache(self.k.detach(), self.v.detach(), self.valid)

    def reset(self, reset: torch.Tensor | None) -> KVCache:
        """Drop the history of the samples flagged in reset (B,) bool."""
        if reset is None:
            return self
        return KVCache(self.k, self.v, self.valid & ~reset[:, None])


def windowed_self_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, position: int,
    window: int | None, scale: float | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal attention of T new tokens over [cache; new], choosing the cheapest exact path.

    q, k, v: (B, H, T, D), rotated; returns ((B, H, T, D), the cache for the next call).
    A block-aligned call with a full previous block (training) batches every block in one
    SDPA; anything else (decoding, unaligned lengths) takes the general masked path.
    """
    b, _, t, _ = q.shape
    cache_len = 0 if cache is None else cache.k.shape[2]
    aligned = window is not None and position % window == 0 and t % window == 0
    # the batched path masks a sample's previous block as a whole: its validity must be uniform
    uniform = cache_len == 0 or bool((cache.valid.all(1) | ~cache.valid.any(1)).all())
    if aligned and cache_len in (0, window) and uniform:
        prev = (cache.k, cache.v, cache.valid.all(dim=1)) if cache_len else (None, None, None)
        o = blockwise_window_attention(q, k, v, window, *prev, scale=scale)
    else:
        o = cached_attention(q, k, v, position, window, *(
            (cache.k, cache.v, cache.valid) if cache_len else (None, None, None)), scale=scale)
    valid = torch.ones(b, t, dtype=torch.bool, device=q.device)
    if cache_len:
        keys, values = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
        valid = torch.cat([cache.valid, valid], dim=1)
    else:
        keys, values = k, v
    return o, KVCache(*trim_cache(keys, values, valid, position + t, window))


class HeadScale(nn.Module):
    """Learned per-head temperature for L2-normalised queries and keys, split across TP ranks.

    With unit-norm q and k the logits lie in [-1, 1]; the scale (initialised to sqrt(D))
    sets how peaked attention can get. One entry per GLOBAL head, sharded like the heads.
    """

    def __init__(self, num_heads: int, head_dim: int, tp: TensorParallel) -> None:
        super().__init__()
        local = num_heads // tp.size
        full = torch.full((num_heads,), float(head_dim) ** 0.5)
        self.weight = nn.Parameter(full[tp.rank * local:(tp.rank + 1) * local].clone())  # (H_local,)
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """q: (B, H, T, D) -> scale * q / |q|; pair with unit keys and SDPA's scale=1."""
        return F.normalize(q, dim=-1) * self.weight.to(q.dtype)[None, :, None, None]


class SelfAttention(nn.Module):
    """Multi-head causal self-attention, optionally block-windowed, on TP linears."""

    def __init__(
        self, hidden: int, num_heads: int, config: TransformerConfig, tp: TensorParallel, *,
        window: int | None = None, rotary_base: float = 10000.0, qk_norm: bool = False, concat: int = 1,
    ) -> None:
        """concat > 1: the output projection takes `concat` outputs per head (the BRT layer's
        [self ; cross] attention), interleaved per head so TP shards stay whole heads."""
        super().__init__()
        if num_heads % tp.size:
            raise ValueError(f"model.num_heads={num_heads} is not divisible by parallel.tensor={tp.size}")
        self.local_heads = num_heads // tp.size
        self.head_dim = hidden // num_heads
        self.window = window
        self.q_proj = column(hidden, hidden, config, tp)
        self.k_proj = column(hidden, hidden, config, tp)
        self.v_proj = column(hidden, hidden, config, tp)
        self.out_proj = row(concat * hidden, hidden, config, tp)
        self.rotary = Rotary(self.head_dim, rotary_base)
        self.qk_scale = HeadScale(num_heads, self.head_dim, tp) if qk_norm else None

    def heads(self, y: torch.Tensor) -> torch.Tensor:
        """(T, B, H_local * D) -> (B, H_local, T, D)."""
        t, b = y.shape[:2]
        return y.view(t, b, self.local_heads, self.head_dim).permute(1, 2, 0, 3)

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        """(B, H_local, T, D) -> (T, B, H_local * D)."""
        b, h, t, d = o.shape
        return o.permute(2, 0, 1, 3).reshape(t, b, h * d)

    def rotate(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """(B, H, T, D) rotated for absolute positions position .. position + T - 1."""
        return self.rotary(x.transpose(1, 2), position).transpose(1, 2)

    def qkv(self, x: torch.Tensor, position: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float | None]:
        """x: (T, B, d) -> q, k (rotated) and v, each (B, H_local, T, D), and the SDPA scale."""
        q = self.heads(self.q_proj(x)[0])
        k = self.heads(self.k_proj(x)[0])
        v = self.heads(self.v_proj(x)[0])
        scale = None
        if self.qk_scale is not None:
            q, k = self.qk_scale(q), F.normalize(k, dim=-1)
            scale = 1.0
        return self.rotate(q, position), self.rotate(k, position), v, scale

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, position: int = 0
                ) -> tuple[torch.Tensor, KVCache]:
        """x: (T, B, d) at positions position.. -> ((T, B, d), the cache for the next call)."""
        q, k, v, scale = self.qkv(x, position)
        o, new_cache = windowed_self_attention(q, k, v, cache, position, self.window, scale)  # (B, H, T, D)
        out, _ = self.out_proj(self.merge(o))  # (T, B, d), all-reduced over TP
        return out, new_cache
