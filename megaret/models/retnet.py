"""RetNet: a stack of pre-norm retention blocks on megatron-core tensor-parallel layers.

Activations run sequence-first, (T, B, d), as megatron-core's layers (and its sequence
parallelism) expect. The model takes its tensor-parallel group as an argument and
contains no launch or process-group plumbing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    gather_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from megatron.core.transformer import TransformerConfig
from torch import nn

from megaret.config import ModelConfig
from megaret.models.ffn import FeedForward
from megaret.models.norms import build_norm
from megaret.models.retention_layer import MultiScaleRetention
from megaret.parallel.context import TensorParallel


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

    def forward(self, x: torch.Tensor, state: torch.Tensor | None, position: int, mode: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (T, B, d) -> ((T, B, d), this layer's new retention state)."""
        y, new_state = self.retention(self.retention_norm(x), state, position, mode)
        x = x + self.dropout(y)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x, new_state


class RetNet(nn.Module):
    """Token ids in, vocab-parallel logits (and per-token loss) out, with carried state."""

    def __init__(self, cfg: ModelConfig, config: TransformerConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.cfg = cfg
        self.config = config  # megatron-core schedules read model.config
        self.tp = tp
        self.embedding = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, init_method=config.init_method, config=config, tp_group=tp.group
        )
        self.layers = nn.ModuleList(RetNetBlock(cfg, config, tp) for _ in range(cfg.num_layers))
        self.final_norm = build_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)
        self.output = ColumnParallelLinear(
            cfg.hidden_size, cfg.vocab_size, config=config, init_method=config.init_method, bias=False,
            gather_output=False, skip_weight_param_allocation=cfg.tie_embeddings, tp_group=tp.group,
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        state: RetNetState | None = None,
        mode: str | None = None,
    ) -> RetNetOutput:
        """tokens: (B, T) int ids; labels: (B, T) or None; state: from a previous call."""
        mode = mode or self.cfg.retention_mode
        position = 0 if state is None else state.position
        layer_states = [None] * len(self.layers) if state is None else state.layers
        if len(layer_states) != len(self.layers):
            raise ValueError(f"state has {len(layer_states)} layers; this model has {len(self.layers)}")
        x = self.embedding(tokens.t().contiguous())  # (T, B, d)
        x = self.dropout(x)
        new_states = []
        for layer, layer_state in zip(self.layers, layer_states, strict=True):
            x, s = layer(x, layer_state, position, mode)
            new_states.append(s)
        x = self.final_norm(x)
        weight = self.embedding.weight if self.cfg.tie_embeddings else None
        logits, _ = self.output(x, weight=weight)  # (T, B, V / tp)
        loss = None
        if labels is not None:
            # The softmax runs in fp32 (or fp64 when the model does) whatever the activations.
            ce_logits = logits if logits.dtype == torch.float64 else logits.float()
            loss = vocab_parallel_cross_entropy(ce_logits, labels.t().contiguous()).t()  # (B, T)
        next_state = RetNetState(new_states, position + tokens.shape[1])
        return RetNetOutput(logits.transpose(0, 1), loss, next_state)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, T, V / tp) -> (B, T, V): the full vocabulary, gathered over the TP group."""
        return gather_from_tensor_model_parallel_region(logits, group=self.tp.group)

    def init_state(self, batch_size: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | None = None) -> RetNetState:
        """Zero states: equivalent to starting a fresh sequence."""
        first = self.layers[0].retention
        shape = (batch_size, first.local_heads, first.key_dim, first.value_dim)
        return RetNetState([torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers], 0)
