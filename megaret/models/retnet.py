"""RetNet: a stack of pre-norm retention blocks on megatron-core tensor-parallel layers.

Activations run sequence-first, (T, B, d), as megatron-core's layers (and its sequence
parallelism) expect. The model takes its tensor-parallel group as an argument and
contains no launch or process-group plumbing.

A model can also be one pipeline stage (`pre_process`: the embedding, `post_process`: final
norm, output layer and loss, `layers`: the global indices of the blocks it holds); what all
archs share for that lives in megaret/models/stage.py.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig
from torch import nn

from megaret.config import ModelConfig
from megaret.models.dropout import ResidualDropout
from megaret.models.ffn import FeedForward
from megaret.models.norms import build_norm
from megaret.models.retention_layer import MultiScaleRetention
from megaret.models.stage import StagedLanguageModel
from megaret.models.state import StackState, tensor_bytes, to_device
from megaret.parallel.context import NO_CP, ContextParallel, TensorParallel

__all__ = ["RetNet", "RetNetBlock", "RetNetState"]


class RetNetState(StackState):
    """Per-layer retention states, each (B, H_local, Dk, Dv), and the absolute position of the
    next token (for the rotary angles). A fresh sample's state is zero."""

    layers: list[torch.Tensor]

    @staticmethod
    def _layer_detach(s: torch.Tensor) -> torch.Tensor:
        return s.detach()

    @staticmethod
    def _layer_reset(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = (~mask).to(device=s.device, dtype=s.dtype).view(-1, 1, 1, 1)
        return s * keep

    @staticmethod
    def _layer_batch(s: torch.Tensor) -> int:
        return s.shape[0]

    @staticmethod
    def _layer_nbytes(s: torch.Tensor) -> int:
        return tensor_bytes(s)

    @staticmethod
    def _layer_state_dict(s: torch.Tensor) -> torch.Tensor:
        return s.detach().cpu().clone()

    @classmethod
    def _layer_from_state_dict(cls, d: torch.Tensor, device: torch.device | None) -> torch.Tensor:
        return to_device(d, device)


class RetNetBlock(nn.Module):
    """x + MSR(LN(x)), then + FFN(LN(.)), each branch with dropout."""

    def __init__(self, cfg: ModelConfig, config: TransformerConfig, tp: TensorParallel,
                 cp: ContextParallel = NO_CP) -> None:
        super().__init__()
        self.retention_norm = build_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)
        self.retention = MultiScaleRetention(
            cfg.hidden_size, cfg.num_heads, cfg.value_factor, config, tp,
            chunk_size=cfg.chunk_size, decay_schedule=cfg.decay_schedule, kernel=cfg.retention_kernel,
            rotary_base=cfg.rotary_base, norm_eps=cfg.norm_eps, cp=cp,
        )
        self.ffn_norm = build_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)
        self.ffn = FeedForward(cfg.hidden_size, cfg.ffn_hidden_size, cfg.ffn_type, config, tp)
        self.dropout = ResidualDropout(cfg.dropout, config.sequence_parallel and tp.size > 1)

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
    states (T, B, d) instead of a ModelOutput.
    """

    state_type = RetNetState

    def build_layer(self, index: int, config: TransformerConfig) -> nn.Module:
        return RetNetBlock(self.cfg, config, self.tp, self.cp)

    def layer_inputs(self, doc_start: torch.Tensor | None, retention_mode: str | None) -> tuple:
        """(retention form, doc_start): the form is retention_mode, else model.retention_mode; a
        document start zeroes every layer's retention state just before it (rotary positions run
        on: retention depends only on positions within a document)."""
        return (retention_mode or self.cfg.retention_mode, doc_start)

    def init_state(self, batch_size: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | None = None) -> RetNetState:
        """Zero states: equivalent to starting a fresh sequence."""
        first = self.layers[0].retention
        shape = (batch_size, first.local_heads, first.key_dim, first.value_dim)
        return RetNetState([torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers], 0)
