"""Normalisation layers used by the residual blocks."""

from __future__ import annotations

import torch
from torch import nn

from megaret.config.schema import NormType, check_choice


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.float() * scale).to(x.dtype) * self.weight


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """Pre-norm for a residual branch: 'layernorm' or 'rmsnorm'."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    check_choice("model.norm_type", kind, NormType)
    return RMSNorm(dim, eps=eps)


def head_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head normalisation (GroupNorm with one group per head, no affine).

    x: (B, T, H, Dv); each head's Dv channels are normalised on their own, which makes
    the retention output's scale irrelevant (and keeps it identical under TP, where a
    rank holds whole heads).
    """
    return torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)
