"""FlexAttention for the masks SDPA's fused kernels cannot take: document ids, key validity, BRT's
state -> token attention restricted to a block's last document.

Every use shares one mask rule, whose inputs are all tensors (so compiled FlexAttention traces
it once and a new batch's documents only change its inputs): query q of sample b sees key kv when

    lo[q] <= k_pos[kv] <= q_pos[q]   and   q_doc[b, q] == k_doc[b, kv]

with q_pos / k_pos absolute positions, lo[q] the first key position the window lets q see (the
first key's position without a window), and k_doc = -1 for keys a sample has dropped (document
ids are >= 0). The block mask (tiles of 128 x 128) lets the fused kernel skip the tiles the rule
empties: a block window costs O(T * 2W), not O(T^2).

On CUDA both FlexAttention and the block-mask builder run compiled; elsewhere eagerly (forward
only on the CPU in torch 2.13). Which calls come here is megaret.ops.attention_backend's choice.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

__all__ = ["document_attention", "key_masked_attention"]


def _rule(q_pos: torch.Tensor, lo: torch.Tensor, k_pos: torch.Tensor, q_doc: torch.Tensor,
          k_doc: torch.Tensor) -> Callable:
    """The mask_mod of the module docstring over (Tq,), (Tq,), (Tk,), (B, Tq), (B, Tk) tensors."""

    def visible(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (k_pos[kv] <= q_pos[q]) & (k_pos[kv] >= lo[q]) & (q_doc[b, q] == k_doc[b, kv])

    return visible


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)  # training shapes are fixed: one static kernel each


def _block_mask(rule, b: int, tq: int, tk: int, device: torch.device) -> BlockMask:
    build = _compiled(create_block_mask) if device.type == "cuda" else create_block_mask
    return build(rule, b, None, tq, tk, device=device)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask,
            scale: float | None) -> torch.Tensor:
    if q.device.type == "cuda":
        return _compiled(flex_attention)(q, k, v, block_mask=mask, scale=scale)
    with warnings.catch_warnings():  # eager FlexAttention (CPU tests) warns that it is not compiled
        warnings.simplefilter("ignore")
        return flex_attention(q, k, v, block_mask=mask, scale=scale)


# the last document mask built, reused by the next layers of the same call (same doc tensor)
_last: tuple[tuple, BlockMask] | None = None


def _reused(key: tuple, objects: tuple[torch.Tensor | None, ...]) -> BlockMask | None:
    if _last is None or _last[0][0] != key:
        return None
    return _last[1] if all(r() is o for r, o in zip(_last[0][1], objects, strict=True)) else None


def _remember(key: tuple, objects: tuple[torch.Tensor | None, ...], mask: BlockMask) -> None:
    global _last
    refs = tuple((weakref.ref(o) if o is not None else (lambda: None)) for o in objects)
    _last = ((key, refs), mask)


def document_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: int, window: int | None,
    key_valid: torch.Tensor | None, doc: torch.Tensor, scale: float | None = None,
) -> torch.Tensor:
    """megaret.ops.attention.attend_to_cache's document-masked attention on FlexAttention.

    q: (B, H, T, D) at positions position .. position+T-1; keys/values: (B, H, S, D) ending with
    the T new tokens; key_valid: (B, S) bool or None; doc: (B, T) long document ids of the new tokens
    (non-decreasing; the S - T earlier keys are document 0). Returns (B, H, T, D).
    """
    b, _, t, _ = q.shape
    s, dev = keys.shape[2], q.device
    versions = (doc._version, None if key_valid is None else key_valid._version)
    key = (position, t, s, window, b, str(dev), *versions)
    mask = _reused(key, (doc, key_valid))
    if mask is None:
        q_pos = torch.arange(position, position + t, device=dev)  # (T,)
        k_pos = torch.arange(position + t - s, position + t, device=dev)  # (S,)
        lo = torch.full_like(q_pos, position + t - s) if window is None else (
            (torch.div(q_pos, window, rounding_mode="floor") - 1) * window)  # (T,)
        k_doc = torch.cat([torch.zeros(b, s - t, dtype=doc.dtype, device=dev), doc], dim=1)  # (B, S)
        if key_valid is not None:
            k_doc = torch.where(key_valid, k_doc, -1)
        mask = _block_mask(_rule(q_pos, lo, k_pos, doc, k_doc), b, t, s, dev)
        _remember(key, (doc, key_valid), mask)
    return _attend(q, keys, values, mask, scale)


def key_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_visible: torch.Tensor,
                         scale: float | None = None) -> torch.Tensor:
    """Attention without positions where only some keys count: q (B, H, Tq, D) over k, v
    (B, H, Tk, D), key_visible (B, Tk) bool (each sample must see at least one key) -> (B, H, Tq, D)."""
    b, _, tq, _ = q.shape
    tk, dev = k.shape[2], q.device
    q_pos = torch.full((tq,), tk, device=dev)  # after every key: no causal limit
    lo = torch.zeros(tq, dtype=torch.long, device=dev)
    k_pos = torch.arange(tk, device=dev)
    q_doc = torch.zeros(b, tq, dtype=torch.long, device=dev)
    k_doc = torch.where(key_visible, 0, -1).long()  # (B, Tk)
    return _attend(q, k, v, _block_mask(_rule(q_pos, lo, k_pos, q_doc, k_doc), b, tq, tk, dev), scale)
