"""Causal self-attention on megatron-core tensor-parallel linears, with a KV/block cache.

q/k/v come from ColumnParallelLinear (each TP rank holds H / tp whole heads), the output
goes through RowParallelLinear (all-reduce). Positions are rotary. With `window` set the
attention is block-windowed (previous block + causal current block) and the cache keeps
only what the next token can still see; without it the cache keeps every key (decoding),
in a preallocated buffer that grows geometrically, so a decoding step writes its key and
value in place instead of copying the whole cache.
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
from megaret.models.state import tensor_bytes, to_device
from megaret.ops.attention import (
    attend_to_cache,
    blockwise_window_attention,
    cached_attention,
    key_documents,
    masked_blockwise_window_attention,
    trim_cache,
)
from megaret.ops.attention_backend import masked_kernel
from megaret.parallel.attention_cp import exchange_last_blocks, heads_to_sequence, sequence_to_heads
from megaret.parallel.context import NO_CP, ContextParallel, TensorParallel

GROWTH = 1.5  # capacity multiplier on reallocation: O(log N) copies for N appended tokens
_ALIGN = 64  # capacities are rounded up to a multiple of this many tokens


def grown_capacity(needed: int) -> int:
    """The capacity a buffer that must hold `needed` tokens is reallocated to (geometric growth)."""
    return -(-max(needed, int(needed * GROWTH)) // _ALIGN) * _ALIGN


class KVBuffer:
    """Preallocated storage behind the KVCaches of one decoding stream.

    k, v: (B, H_local, capacity, D); valid: (B, capacity) bool. `length` is the frontier: the
    number of entries some cache over this buffer has written. Every cache over the buffer is
    a view of the first n <= length entries, and entries are only ever written at the frontier,
    so appending never changes what an existing cache sees. A cache that is not at the frontier
    (someone already appended from it: branching, re-running a step) appends by copying into a
    new buffer instead. Entries from the frontier on are valid (True) until written.
    """

    __slots__ = ("k", "v", "valid", "length", "all_valid")

    def __init__(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, length: int,
                 all_valid: bool | None = None) -> None:
        fits = k.shape == v.shape and valid.shape == (k.shape[0], k.shape[2])
        if not (fits and 0 <= length <= k.shape[2]):
            raise ValueError(f"KVBuffer: k {tuple(k.shape)}, v {tuple(v.shape)}, valid {tuple(valid.shape)}, "
                             f"length {length} do not fit together")
        self.k, self.v, self.valid, self.length = k, v, valid, length
        # whether entries [0, length) are all valid (None: not known, look when asked)
        self.all_valid = all_valid

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @classmethod
    def copy_of(cls, cache: KVCache, capacity: int, like: torch.Tensor | None = None) -> KVBuffer:
        """A new buffer of `capacity` >= cache.length holding a copy of the cache (dtype and
        device of `like` when given, else of the cache)."""
        b, h, n, d = cache.k.shape
        like = cache.k if like is None else like
        k = torch.empty(b, h, capacity, d, dtype=like.dtype, device=like.device)
        v = torch.empty_like(k)
        valid = torch.ones(b, capacity, dtype=torch.bool, device=like.device)
        k[:, :, :n] = cache.k
        v[:, :, :n] = cache.v
        valid[:, :n] = cache.valid
        return cls(k, v, valid, n, bool(cache.valid.all()))

    def view(self, n: int) -> KVCache:
        """The cache of the first n <= length entries."""
        cache = KVCache(self.k[:, :, :n], self.v[:, :, :n], self.valid[:, :n])
        cache._buffer = self
        return cache

    def extends(self, cache: KVCache, k: torch.Tensor) -> bool:
        """Whether appending k (B, H, T, D) from `cache` may write into this buffer in place."""
        n, t = cache.length, k.shape[2]
        return (self.length == n and n + t <= self.capacity and k.dtype == self.k.dtype
                and k.device == self.k.device and k.shape[:2] == self.k.shape[:2]
                and k.shape[3] == self.k.shape[3]
                and (not self.k.is_inference() or torch.is_inference_mode_enabled()))


@dataclass
class KVCache:
    """Keys (rotated) and values of the tokens before the next call, with per-sample validity.

    k, v and valid may be views of the first L entries of a larger KVBuffer (capacity >= L):
    `append` then writes new tokens in place. The buffer is not a dataclass field, so a
    checkpoint (`state_dict`) holds only the live, compact views, and a cache rebuilt from them
    has capacity L (its next append reallocates).
    """

    k: torch.Tensor  # (B, H_local, L, D)
    v: torch.Tensor  # (B, H_local, L, D)
    valid: torch.Tensor  # (B, L) bool: False for history a sample has dropped (document start)

    def __post_init__(self) -> None:
        self._buffer: KVBuffer | None = None  # storage with room to grow (not a dataclass field)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def with_capacity(cls, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None,
                      capacity: int | None = None) -> KVCache:
        """A cache of k, v (B, H, L, D) copied into a buffer with room for `capacity` >= L tokens
        (default: grown_capacity(L)); valid (B, L) defaults to all True."""
        if valid is None:
            valid = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
        cache = cls(k, v, valid)
        capacity = grown_capacity(cache.length) if capacity is None else capacity
        if capacity < cache.length:
            raise ValueError(f"capacity {capacity} is below the cache length {cache.length}")
        return KVBuffer.copy_of(cache, capacity).view(cache.length)

    @classmethod
    def from_buffers(cls, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, length: int
                     ) -> KVCache:
        """A cache over the first `length` entries of k, v (B, H, capacity, D) and valid
        (B, capacity), without copying: the cache takes the buffers over (entries from `length`
        on are written by appends, and must be valid = True when valid is given)."""
        if valid is None:
            valid = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
        return KVBuffer(k, v, valid, length, bool(valid[:, :length].all())).view(length)

    # -- properties -------------------------------------------------------------------------------

    @property
    def length(self) -> int:
        return self.k.shape[2]

    @property
    def capacity(self) -> int:
        """How many tokens the storage under this cache holds (== length without a buffer)."""
        return self.length if self._buffer is None else self._buffer.capacity

    @property
    def buffer(self) -> KVBuffer | None:
        return self._buffer

    def all_valid(self) -> bool:
        """Whether no sample has dropped any of its history (known without a look when the
        cache was grown from a buffer)."""
        if self._buffer is not None and self._buffer.all_valid:
            return True  # this cache's entries are some of the buffer's valid ones
        return bool(self.valid.all())

    # -- growing ----------------------------------------------------------------------------------

    def append(self, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        """The cache with T more tokens k, v (B, H, T, D) after this one's L: written in place
        when this cache is the buffer's frontier and the capacity allows, otherwise into a new
        buffer grown geometrically (one copy). This cache is left unchanged either way.

        Under autograd (grad enabled and a tensor requires grad) it concatenates instead: an
        in-place write would invalidate the views saved for backward."""
        t = k.shape[2]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad
                                        or self.k.requires_grad or self.v.requires_grad):
            valid = torch.ones(k.shape[0], t, dtype=torch.bool, device=k.device)
            return KVCache(torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2),
                           torch.cat([self.valid, valid], dim=1))
        n = self.length
        buf = self._buffer
        if buf is None or not buf.extends(self, k):
            buf = KVBuffer.copy_of(self, grown_capacity(n + t), like=k)
        buf.k[:, :, n:n + t] = k
        buf.v[:, :, n:n + t] = v
        buf.length = n + t  # the new entries are valid: the buffer holds True from the frontier on
        return buf.view(n + t)

    def reserve(self, capacity: int) -> KVCache:
        """This cache with room for at least `capacity` tokens without another reallocation
        (itself when it already has it and is at its buffer's frontier, otherwise one copy)."""
        buf = self._buffer
        if buf is not None and buf.length == self.length and buf.capacity >= capacity:
            return self
        return KVBuffer.copy_of(self, max(capacity, self.length)).view(self.length)

    # -- the rest ---------------------------------------------------------------------------------

    def detach(self) -> KVCache:
        cache = KVCache(self.k.detach(), self.v.detach(), self.valid)
        cache._buffer = self._buffer  # a buffer never requires grad (appends under autograd concatenate)
        return cache

    def reset(self, mask: torch.Tensor | None) -> KVCache:
        """Drop the history of the samples flagged in mask (B,) bool."""
        if mask is None:
            return self
        return KVCache(self.k, self.v, self.valid & ~mask.bool()[:, None])  # the next append copies

    # -- the state protocol (megaret/models/state.py) ---------------------------------------------

    state_keys = ("k", "v", "valid")

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the live entries (a preallocated buffer's spare capacity not counted)."""
        return tensor_bytes(self.k, self.v, self.valid)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The live entries, compact, on the CPU (the buffer's spare capacity is not saved: a
        cache rebuilt from them has capacity L, and its next append reallocates)."""
        return {name: t.detach().cpu().clone(memory_format=torch.contiguous_format)
                for name, t in (("k", self.k), ("v", self.v), ("valid", self.valid))}

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor], device: torch.device | str | None = None) -> KVCache:
        return cls(*(to_device(d[name], device) for name in cls.state_keys))

    def __getstate__(self) -> dict:
        """Pickling (and deepcopy) keeps only the live entries, compact, without the buffer."""
        if self._buffer is None:
            return {"k": self.k, "v": self.v, "valid": self.valid}
        return {"k": self.k.clone(memory_format=torch.contiguous_format),
                "v": self.v.clone(memory_format=torch.contiguous_format),
                "valid": self.valid.clone(memory_format=torch.contiguous_format)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._buffer = None


def windowed_self_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, position: int,
    window: int | None, scale: float | None = None, doc: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal attention of T new tokens over [cache; new], choosing the cheapest exact path.

    q, k, v: (B, H, T, D), rotated; returns ((B, H, T, D), the cache for the next call).
    Without a window (full causal attention) the new keys/values are appended to the cache
    in place (a preallocated, geometrically growing KVBuffer) and the queries attend to the
    cache's L + T keys without another copy. With a window, a call starting on a block boundary
    with a full previous block or none (training, prompts) folds its blocks into one SDPA call
    without a mask tensor; anything else (decoding inside a block) takes the general masked
    path, and the cache is trimmed.

    doc: (B, T) long document ids of the new tokens (non-decreasing; 0 continues the cache's
    document) or None. A query sees only keys of its own document (FlexAttention on CUDA; on
    other devices boolean SDPA masks, block by block where the call is block-aligned), and the
    returned cache keeps only the last document's keys valid (the next call continues that document).
    """
    if window is None and cache is not None and (cache.length or cache.buffer is not None) and doc is None:
        # (with document ids the general path below masks across documents)
        cache = cache.append(k, v)  # (B, H, L + T, D) views, the new tokens last
        key_valid = None if cache.all_valid() else cache.valid
        return attend_to_cache(q, cache.k, cache.v, position, None, key_valid, scale), cache
    b, _, t, _ = q.shape
    cache_len = 0 if cache is None else cache.k.shape[2]
    # the block paths mask a sample's previous block as a whole: its validity must be uniform
    blocks = (window is not None and position % window == 0 and cache_len in (0, window)
              and (cache_len == 0 or bool((cache.valid.all(1) | ~cache.valid.any(1)).all())))
    prev = (cache.k, cache.v, cache.valid.all(dim=1)) if cache_len else (None, None, None)
    if blocks and doc is None:
        o = blockwise_window_attention(q, k, v, window, *prev, scale=scale)
    elif blocks and t % window == 0 and masked_kernel(q.device) == "sdpa":
        o = masked_blockwise_window_attention(q, k, v, window, *prev, scale=scale, doc=doc)
    else:  # document masks on FlexAttention (CUDA) or one boolean mask; decoding inside a block
        o = cached_attention(q, k, v, position, window, *(
            (cache.k, cache.v, cache.valid) if cache_len else (None, None, None)), scale=scale, doc=doc)
    valid = torch.ones(b, t, dtype=torch.bool, device=q.device)
    if cache_len:
        keys, values = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
        valid = torch.cat([cache.valid, valid], dim=1)
    else:
        keys, values = k, v
    if doc is not None:  # only the last document continues into the next call
        valid = valid & (key_documents(doc, valid.shape[1]) == doc[:, -1:])
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
        cp: ContextParallel = NO_CP,
    ) -> None:
        """concat > 1: the output projection takes `concat` outputs per head (the BRT layer's
        [self ; cross] attention), interleaved per head so TP shards stay whole heads.
        cp: context parallel (x holds slice cp.rank of the sequence; megaret/parallel/attention_cp.py)."""
        super().__init__()
        if num_heads % (tp.size * cp.size):
            raise ValueError(f"model.num_heads={num_heads} is not divisible by parallel.tensor * "
                             f"parallel.context_parallel={tp.size}*{cp.size}")
        self.local_heads = num_heads // tp.size
        self.head_dim = hidden // num_heads
        self.window = window
        self.cp = cp
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

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, position: int = 0,
                doc: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """x: (T, B, d) at positions position.. -> ((T, B, d), the cache for the next call);
        doc: (B, T) document ids (0 continues the cache's document), or None."""
        q, k, v, scale = self.qkv(x, position)
        if self.cp.size > 1 and self.window is not None:  # the previous rank's last block (halo)
            o, new_cache = self._halo_attention(q, k, v, scale, cache, position, doc)
        elif self.cp.size > 1:  # Ulysses: the whole sequence of H / cp heads, attended as one process would
            position -= self.cp.rank * q.shape[2]  # the sequence's first position (this slice's was given)
            q, k, v = (sequence_to_heads(t, self.cp) for t in (q, k, v))  # (B, H / cp, T, D)
            o, new_cache = windowed_self_attention(q, k, v, cache, position, None, scale, doc=doc)
            o = heads_to_sequence(o, self.cp)  # (B, H, T_r, D)
        else:
            o, new_cache = windowed_self_attention(q, k, v, cache, position, self.window, scale,
                                                   doc=doc)  # (B, H, T, D)
        out, _ = self.out_proj(self.merge(o))  # (T, B, d), all-reduced over TP
        return out, new_cache

    def _halo_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                        cache: KVCache | None, position: int, doc: torch.Tensor | None
                        ) -> tuple[torch.Tensor, KVCache]:
        """Block-windowed attention of this CP rank's slice (whole blocks, position = its first):
        its first block attends to the previous rank's last block (the halo; CP rank 0 to the
        carried cache), exactly as one process's would (megaret/parallel/attention_cp.py). Returns
        ((B, H, T_r, D), the last rank's last block: the cache the next call carries, on every rank).
        doc: (B, T_r) this slice's document ids, 0 continuing the previous rank's last document."""
        w = self.window
        b, _, t, _ = k.shape
        valid = (torch.ones(b, w, dtype=torch.bool, device=k.device) if doc is None
                 else doc[:, -w:] == doc[:, -1:])  # (B, W): the keys of the document that goes on
        halo, last, bind = exchange_last_blocks(k[:, :, -w:], v[:, :, -w:], valid, self.cp)
        if self.cp.rank:
            cache = KVCache(*halo)
        o, _ = windowed_self_attention(q, k, v, cache, position, w, scale, doc=doc)  # (B, H, T_r, D)
        return bind(o), KVCache(*last)
