"""Rotary position embedding applied to per-head queries and keys."""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    """Rotates interleaved channel pairs of q and k by position-dependent angles.

    The angle for pair i at absolute position n is n * base^(-2i/D). Positions start at
    `position`, so a caller continuing a sequence with carried state passes its offset.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary needs an even head dimension, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (D/2,)

    def forward(self, x: torch.Tensor, position: int | torch.Tensor = 0) -> torch.Tensor:
        """x: (B, T, H, D) -> the same shape, rotated. `position` may be a 0-d integer tensor on
        x's device (a decoding step replayed from a CUDA graph reads it there)."""
        t = x.shape[1]
        pos = torch.arange(t, dtype=torch.float64, device=x.device) + position  # (T,)
        angles = pos[:, None] * self.inv_freq.to(x.device)[None, :]  # (T, D/2)
        cos = angles.cos().to(x.dtype)[None, :, None, :]  # (1, T, 1, D/2)
        sin = angles.sin().to(x.dtype)[None, :, None, :]
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, T, H, D/2) each
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
