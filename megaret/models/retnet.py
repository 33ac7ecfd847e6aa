"""RetNet: a stack of pre-norm retention blocks on megatron-core tensor-parallel layers.

Activations run sequence-first, (T, B, d), as megatron-core's layers (and its sequence
parallelism) expect. The model takes its tensor-parallel group as an argument and
contains no launch or process-group plumbing.

A model can also be one pipeline stage (`pre_process`: the embedding, `post_process`: final
norm, output layer and loss, `layers`: the global indices of the blocks it holds); what all
archs share for that lives in megaret/models/stage.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer import TransformerConfig
from torch import nn

from megaret.config import ModelConfig
from megaret.models.ffn import FeedForward
from megaret.models.norms import build_norm
from megaret.models.retention_layer import MultiScaleRetention
from megaret.models.stage import StagedLanguageModel, stage_layers
from megaret.parallel.context import TensorParallel

__all__ = ["RetNet", "RetNetBlock", "RetNetOutput", "RetNetState", "stage_layers"]


@dataclass
class RetNetState:
    """What a caller carries to continue a sequence: per-layer retention states and the
    absolute position of the next token (for the rotary angles)."""

    layers: list[torch.Tensor]  # each (B, H_local, Dk, Dv)
    position: int

    def detach(self) -> RetNetState:
        return RetNetState([s.detach() for s in self.layers], self.position)


@dataclass
class RetNetOutput:
    logits: torch.Tensor  # (B, T, V / tp): this rank's vocabulary slice
    loss: torch.Tensor | None  # (B, T) per-token cross-entropy when labels are given
    state: RetNetState


class RetNetBlock(nn.Module):
    """x + MSR(LN(x)), then + FFN(LN(.)), each branch with dropout."""

    def __init__(self, cfg: ModelConfig, config: TransformerConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.retention_norm = build_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)
        self.retention = MultiScaleRetention(
            cfg.hidden_size, cfg.num_heads, cfg.value_factor, config, tp,
            chunk_size=cfg.chunk_size, decay_schedule=cfg.decay_schedule,
            rotary_base=cfg.rotary_base, norm_eps=cfg.norm_eps,
        )
        self.ffn_norm = build_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)
        self.ffn = FeedForward(cfg.hidden_size, cfg.ffn_hidden_size, cfg.ffn_type, config, tp)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None, position: int, mode: str,
                doc_start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (T, B, d) -> ((T, B, d), this layer's new retention state)."""
        y, new_state = self.retention(self.retention_norm(x), state, position, mode, doc_start)
        x = x + self.dropout(y)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x, new_state


class RetNet(StagedLanguageModel):
    """Token ids in, vocab-parallel logits (and per-token loss) out, with carried state.

    As one pipeline stage (see StagedLanguageModel): a non-last stage returns its hidden
    states (T, B, d) instead of a RetNetOutput.
    """

    state_type = RetNetState
    output_type = RetNetOutput

    def build_layer(self, index: int, config: TransformerConfig) -> nn.Module:
        return RetNetBlock(self.cfg, config, self.tp)

    def forward(
        self,
        tokens: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        state: RetNetState | None = None,
        mode: str | None = None,
        doc_start: torch.Tensor | None = None,
        return_state: bool = False,
    ) -> RetNetOutput | torch.Tensor | tuple[torch.Tensor, RetNetState]:
        """tokens: (B, T) int ids (ignored by a non-first stage); labels: (B, T) or None;
        state: from a previous call. A non-last stage returns its hidden states (T, B, d), or
        (hidden, the state of its layers) with return_state (stateful training under a pipeline).
        doc_start: (B, T) bool or None: True where a document starts inside the sample; every
        layer's retention state is zeroed just before it, so packed documents do not see each
        other (rotary positions run on: retention depends only on positions within a document)."""
        return self.run_stack(tokens, labels, state, return_state, mode or self.cfg.retention_mode, doc_start)

    def init_state(self, batch_size: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | None = None) -> RetNetState:
        """Zero states: equivalent to starting a fresh sequence."""
        first = self.layers[0].retention
        shape = (batch_size, first.local_heads, first.key_dim, first.value_dim)
        return RetNetState([torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers], 0)
