"""Which kernel runs masked attention: the one place that decides, logged once per device type.

Unmasked, causal and block-windowed attention always go to SDPA without a tensor mask
(`is_causal` or `torch.nn.attention.bias.causal_lower_right`), which its flash and
memory-efficient kernels accept. What needs a real mask (document ids inside packed samples,
BRT's state -> token attention restricted to the block's last document) runs on

- ``flex``: FlexAttention with a block mask (`torch.nn.attention.flex_attention`), compiled on
  CUDA (its fused kernel skips the tiles the mask empties); eager elsewhere, which computes the
  forward only (torch 2.13 has no FlexAttention backward on the CPU) and materialises the scores;
- ``sdpa``: SDPA with a boolean mask (memory-efficient or math kernel): the CPU default, which
  keeps the fp64 parity tests and CPU training exact and differentiable.

CUDA takes ``flex``, any other device ``sdpa``; `masked_kernel_forced` overrides it (tests run the
flex code path on the CPU with it).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.distributed as dist

__all__ = ["MaskedKernel", "masked_kernel", "masked_kernel_forced"]

log = logging.getLogger("megaret.ops")

MaskedKernel = Literal["flex", "sdpa"]
_forced: MaskedKernel | None = None


def masked_kernel(device: torch.device) -> MaskedKernel:
    """The kernel masked attention on `device` runs on (the choice is logged once per device type)."""
    kind: MaskedKernel = _forced or ("flex" if device.type == "cuda" else "sdpa")
    _log_once(device.type, kind)
    return kind


@contextmanager
def masked_kernel_forced(kind: MaskedKernel) -> Iterator[None]:
    """Run masked attention on `kind` whatever the device (tests; flex on the CPU is forward-only)."""
    global _forced
    if kind not in ("flex", "sdpa"):
        raise ValueError(f"masked attention kernel {kind!r}: use 'flex' or 'sdpa'")
    before, _forced = _forced, kind
    try:
        yield
    finally:
        _forced = before


@functools.cache
def _log_once(device_type: str, kind: MaskedKernel) -> None:
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    masked = ("FlexAttention block masks (compiled)" if kind == "flex" and device_type == "cuda"
              else "FlexAttention block masks (eager, forward only)" if kind == "flex"
              else "SDPA boolean masks")
    log.info(f"attention on {device_type}: causal and block-windowed attention on SDPA without a mask "
             f"(is_causal / causal_lower_right); document masks and BRT's masked state attention on {masked}")
