"""Position-wise feed-forward network on column/row tensor-parallel linears."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from torch import nn

from megaret.config.schema import FfnType, check_choice
from megaret.models.parallel_linear import column, row
from megaret.parallel.context import TensorParallel


class FeedForward(nn.Module):
    """gelu: W2 gelu(W1 x); swiglu: W2 (silu(Wg x) * W1 x). Hidden units split across TP."""

    def __init__(self, hidden: int, ffn_hidden: int, kind: str, config: TransformerConfig,
                 tp: TensorParallel) -> None:
        super().__init__()
        check_choice("model.ffn_type", kind, FfnType)
        self.kind = kind
        self.up = column(hidden, ffn_hidden, config, tp)
        self.gate = column(hidden, ffn_hidden, config, tp) if kind == "swiglu" else None
        self.down = row(ffn_hidden, hidden, config, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, B, d) -> (T, B, d)."""
        up, _ = self.up(x)  # (T, B, ffn / tp)
        if self.gate is None:
            h = F.gelu(up)
        else:
            gate, _ = self.gate(x)
            h = F.silu(gate) * up
        out, _ = self.down(h)  # (T, B, d), all-reduced over TP
        return out
