"""Causal and block-windowed attention: masks, a naive reference and SDPA / FlexAttention paths.

Layout: q, k, v are (B, H, T, D), as `scaled_dot_product_attention` wants them.

The window is block-aligned, as in the Block-Recurrent Transformer: with block size W, a
query at absolute position p sees key position s when

    s <= p  and  s // W >= p // W - 1,

i.e. the whole previous block and the causal part of its own block (W to 2W - 1 keys).
Aligning the window to blocks is what lets a segment be processed block by block with only
the previous block cached, and lets training fold every block into the batch of one SDPA call
whose mask is `causal_lower_right` (no tensor mask: SDPA's flash kernel takes it).

Keys carried from an earlier call arrive as a cache with a per-sample validity mask, so a
batch slot that starts a new document can drop its history without touching the others.
Masks that need a tensor (document ids, dropped history) run on the kernel
megaret.ops.attention_backend picks: FlexAttention on CUDA, SDPA with a boolean mask elsewhere.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right
from torch.utils._python_dispatch import _disable_current_modes

from megaret.ops import attention_flex
from megaret.ops.attention_backend import masked_kernel


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(Tq,), (Tk,) absolute positions -> (Tq, Tk) bool, True where the query may see the key."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= torch.div(k_pos, window, rounding_mode="floor")[None, :] >= (
            torch.div(q_pos, window, rounding_mode="floor")[:, None] - 1
        )
    return mask


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float | None = None) -> torch.Tensor:
    """Reference: softmax(scale q k^T + mask) v with an explicit softmax (for tests).

    q: (B, H, Tq, D), k/v: (B, H, Tk, D), mask broadcastable to (B, H, Tq, Tk), True = attend.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)


def cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: int, window: int | None,
    cache_k: torch.Tensor | None = None, cache_v: torch.Tensor | None = None,
    cache_valid: torch.Tensor | None = None, scale: float | None = None, doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """General causal (optionally windowed) attention of new tokens over [cache; new].

    q, k, v: (B, H, T, D) for the T tokens at absolute positions position .. position+T-1;
    cache_k/v: (B, H, L, D) for the L tokens just before them; cache_valid: (B, L) bool;
    doc: (B, T) document ids of the new tokens (0: the cache's document) or None.
    Used for decoding and for calls that are not block-aligned; costs O(T (L + T)).
    """
    t = q.shape[2]
    if cache_k is None or cache_k.shape[2] == 0:
        if doc is None and (window is None or t <= window and position % window == 0):
            # Plain causal attention: SDPA can use its flash kernel.
            return F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=scale)
        keys, values, key_valid = k, v, None
    else:
        keys = torch.cat([cache_k, k], dim=2)  # (B, H, L + T, D)
        values = torch.cat([cache_v, v], dim=2)
        key_valid = None
        if cache_valid is not None and not bool(cache_valid.all()):
            new_valid = torch.ones(q.shape[0], t, dtype=torch.bool, device=q.device)
            key_valid = torch.cat([cache_valid, new_valid], dim=1)  # (B, L + T)
    return attend_to_cache(q, keys, values, position, window, key_valid, scale, doc)


def attend_to_cache(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    position: int,
    window: int | None = None,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal (optionally windowed) attention of the T newest tokens over keys that end with them.

    q: (B, H, T, D) at absolute positions position .. position+T-1; keys/values: (B, H, S, D)
    at positions position+T-S .. position+T-1 (S >= T; any strides SDPA takes, e.g. views of
    a preallocated cache: nothing is copied); key_valid: (B, S) bool, or None when every key
    is valid. One query with no window over all-valid keys sees every key: no mask at all,
    so SDPA may take its flash kernel. doc: (B, T) document ids of the new tokens (the S - T
    earlier keys are document 0) or None: a query sees only keys of its own document.
    """
    t, s = q.shape[2], keys.shape[2]
    if t == 1 and window is None and key_valid is None and doc is None:
        return F.scaled_dot_product_attention(q, keys, values, scale=scale)
    if doc is not None and masked_kernel(q.device) == "flex":
        return attention_flex.document_attention(q, keys, values, position, window, key_valid, doc, scale)
    q_pos = torch.arange(position, position + t, device=q.device)
    k_pos = torch.arange(position + t - s, position + t, device=q.device)
    mask = visible(q_pos, k_pos, window)[None, None]  # (1, 1, T, S)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]  # (B, 1, T, S)
    if doc is not None:
        mask = mask & same_document(doc, s)[:, None]  # (B, 1, T, S)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


def key_documents(doc: torch.Tensor, num_keys: int) -> torch.Tensor:
    """doc (B, T) ids of the newest T keys -> (B, num_keys) ids of all keys (earlier ones: 0)."""
    earlier = torch.zeros(doc.shape[0], num_keys - doc.shape[1], dtype=doc.dtype, device=doc.device)
    return torch.cat([earlier, doc], dim=1)


def same_document(doc: torch.Tensor, num_keys: int) -> torch.Tensor:
    """(B, T, num_keys) bool: query t and key s belong to the same document."""
    return doc[:, :, None] == key_documents(doc, num_keys)[:, None, :]


def key_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_visible: torch.Tensor,
                         scale: float | None = None) -> torch.Tensor:
    """Attention without positions over the keys key_visible (B, Tk) bool marks: q (B, H, Tq, D),
    k/v (B, H, Tk, D) -> (B, H, Tq, D). Each sample must see at least one key."""
    if masked_kernel(q.device) == "flex":
        return attention_flex.key_masked_attention(q, k, v, key_visible, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_visible[:, None, None, :], scale=scale)


@functools.lru_cache(maxsize=64)
def lower_right(q_len: int, k_len: int) -> CausalBias:
    """`causal_lower_right(q_len, k_len)`: query i sees keys 0 .. i + k_len - q_len. Made once per
    shape, outside any dispatch mode (a CausalBias, a tensor subclass, cannot be created inside one,
    e.g. under torch's FlopCounterMode)."""
    with _disable_current_modes():
        return causal_lower_right(q_len, k_len)


def blockwise_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
    prev_k: torch.Tensor | None = None, prev_v: torch.Tensor | None = None,
    prev_valid: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    """Block-windowed causal attention of a segment starting on a block boundary, without a mask tensor.

    q, k, v: (B, H, T, D), any T (a partial last block included); prev_k/v: (B, H, W, D), the
    block before the segment (None: there is none); prev_valid: (B,) bool, False where a
    sample's previous block must be ignored. Blocks 1 .. n-1 are folded into the head dimension
    and attend to [previous block; itself] under `causal_lower_right(W, 2W)` in one SDPA call;
    the first block (over the cached block, or alone) and a partial last block take one call
    each. O(T * 2W) instead of O(T^2), and SDPA's flash kernel accepts every call.
    """
    b, h, t, d = q.shape
    w = window
    n = t // w  # whole blocks
    first = min(w, t)
    head = slice(0, first)
    outs = [_first_block(q[:, :, head], k[:, :, head], v[:, :, head], prev_k, prev_v, prev_valid, scale)]
    if n > 1:
        qb = q[:, :, w:n * w].unflatten(2, (n - 1, w)).flatten(1, 2)  # (B, H (n-1), W, D)
        kb, vb = _block_pairs(k, n, w), _block_pairs(v, n, w)  # (B, H (n-1), 2W, D)
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=lower_right(w, 2 * w), scale=scale)
        outs.append(o.unflatten(1, (h, n - 1)).flatten(2, 3))  # (B, H, (n-1) W, D)
    r = t - n * w
    if r and n:  # the partial last block over [the last whole block; itself]: the last W + r keys
        tail = slice((n - 1) * w, t)
        outs.append(F.scaled_dot_product_attention(q[:, :, n * w:], k[:, :, tail], v[:, :, tail],
                                                   attn_mask=lower_right(r, w + r), scale=scale))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def _block_pairs(x: torch.Tensor, n: int, w: int) -> torch.Tensor:
    """x (B, H, T, D) with n whole blocks of w -> (B, H (n-1), 2w, D): [block i-1; block i], i = 1 .. n-1."""
    xb = x[:, :, :n * w].unflatten(2, (n, w))  # (B, H, n, W, D)
    return torch.cat([xb[:, :, :-1], xb[:, :, 1:]], dim=3).flatten(1, 2)


def _first_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prev_k: torch.Tensor | None,
                 prev_v: torch.Tensor | None, prev_valid: torch.Tensor | None, scale: float | None
                 ) -> torch.Tensor:
    """The segment's first (or only, partial) block, F <= W tokens (B, H, F, D): over [prev; itself]
    where the previous block is valid, causally over itself where it is not."""
    f = q.shape[2]
    valid = q.shape[0] if prev_k is None or prev_valid is None else int(prev_valid.sum())  # one sync
    if prev_k is None or valid == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    keys, values = torch.cat([prev_k, k], dim=2), torch.cat([prev_v, v], dim=2)  # (B, H, W + F, D)
    with_prev = F.scaled_dot_product_attention(q, keys, values, attn_mask=lower_right(f, keys.shape[2]),
                                               scale=scale)
    if valid == q.shape[0]:
        return with_prev
    alone = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return torch.where(prev_valid[:, None, None, None], with_prev, alone)


def masked_blockwise_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
    prev_k: torch.Tensor | None = None, prev_v: torch.Tensor | None = None,
    prev_valid: torch.Tensor | None = None, scale: float | None = None, doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-windowed attention with document ids as one SDPA over (B, H, n, W, 2W) with a boolean
    mask (SDPA's math or memory-efficient kernel): the `sdpa` masked kernel's path (CPU) and the
    reference the mask-free and FlexAttention paths are tested against.

    q, k, v: (B, H, T, D) with T a multiple of W = window, the segment starting on a block
    boundary; prev_k/v: (B, H, W, D), the block before the segment (None: there is none);
    prev_valid: (B,) bool, False where a sample's previous block must be ignored. Each
    block attends to [previous block; itself]: O(T * 2W) instead of O(T^2). doc: (B, T) long
    document ids (non-decreasing; 0 = the document of prev_k/v) or None: a query sees only
    keys of its own document.
    """
    b, h, t, d = q.shape
    w = window
    if t % w:
        raise ValueError(f"segment length {t} is not a multiple of the block size {w}")
    n = t // w
    qb = q.view(b, h, n, w, d)  # (B, H, n, W, D)
    kb, vb = k.view(b, h, n, w, d), v.view(b, h, n, w, d)
    if prev_k is None:
        prev_k, prev_v = torch.zeros_like(kb[:, :, :1]), torch.zeros_like(vb[:, :, :1])
        prev_valid = torch.zeros(b, dtype=torch.bool, device=q.device)
    else:
        prev_k, prev_v = prev_k[:, :, None], prev_v[:, :, None]  # (B, H, 1, W, D)
        if prev_valid is None:
            prev_valid = torch.ones(b, dtype=torch.bool, device=q.device)
    keys = torch.cat([torch.cat([prev_k, kb[:, :, :-1]], dim=2), kb], dim=3)  # (B, H, n, 2W, D)
    values = torch.cat([torch.cat([prev_v, vb[:, :, :-1]], dim=2), vb], dim=3)
    causal = torch.ones(w, w, dtype=torch.bool, device=q.device).tril()  # (W, W)
    # previous-block part: visible for every block but the first, whose previous block is the cache
    prev_vis = torch.ones(b, n, dtype=torch.bool, device=q.device)  # (B, n)
    prev_vis[:, 0] = prev_valid
    prev_part = prev_vis[:, :, None, None].expand(b, n, w, w)  # (B, n, W, W)
    mask = torch.cat([prev_part, causal.expand(b, n, w, w)], dim=-1)  # (B, n, W, 2W)
    if doc is not None:
        docb = doc.view(b, n, w)  # (B, n, W)
        prev_doc = torch.cat([torch.zeros_like(docb[:, :1]), docb[:, :-1]], dim=1)  # (B, n, W)
        key_doc = torch.cat([prev_doc, docb], dim=-1)  # (B, n, 2W)
        mask = mask & (docb[..., :, None] == key_doc[..., None, :])  # every query keeps itself
    mask = mask[:, None]  # (B, 1, n, W, 2W)
    out = F.scaled_dot_product_attention(qb, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(b, h, t, d)


def trim_cache(keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, end: int,
               window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep what the next token at position `end` can still see: with a window, the keys from
    the start of the previous block on; without one, everything. keys/values: (B, H, L, D)
    ending just before `end`; valid: (B, L)."""
    if window is None:
        return keys, values, valid
    start = max(0, (end // window - 1) * window)
    keep = min(keys.shape[2], end - start)
    return keys[:, :, -keep:], values[:, :, -keep:], valid[:, -keep:]
