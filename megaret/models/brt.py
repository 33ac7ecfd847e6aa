"""Block-Recurrent Transformer: a sliding-window Transformer with recurrent layers.

Every layer attends within the block window (previous block cached); the layers named by
model.recurrent_layers are BRT recurrent layers carrying S state vectors. Calls must be
block-aligned (data.seq_length, the segment, is a multiple of model.block_size). The
returned state (per-layer caches and recurrent states) continues the next segment exactly;
the trainer detaches it between steps (truncated backpropagation through time).
"""

from __future__ import annotations

from megatron.core.transformer import TransformerConfig
from torch import nn

from megaret.config import ModelConfig
from megaret.models.brt_layer import RecurrentBlock
from megaret.models.transformer import Transformer, TransformerBlock
from megaret.parallel.context import TensorParallel


class BlockRecurrentTransformer(Transformer):
    """Transformer(arch=sliding) whose configured layers are BRT recurrent layers."""

    def __init__(self, cfg: ModelConfig, config: TransformerConfig, tp: TensorParallel, **stage) -> None:
        """stage: pre_process / post_process / layers, as for Transformer (one pipeline stage)."""
        self.recurrent = set(cfg.recurrent_layer_indices)
        super().__init__(cfg, config, tp, window=cfg.block_size, **stage)

    def build_layer(self, index: int, config: TransformerConfig) -> nn.Module:
        if index in self.recurrent:
            return RecurrentBlock(self.cfg, config, self.tp)
        return TransformerBlock(self.cfg, config, self.tp, self.window)
