"""Transformer baselines: a causal Transformer and a sliding-window (block-windowed) one.

Pre-norm blocks with the same embeddings, FFN, norms and vocab-parallel head as RetNet,
so the archs differ only in their token mixer. Activations run sequence-first, (T, B, d).
Both carry a per-layer KV cache: all keys for the causal Transformer (decoding), the
previous block (plus the current partial one) for the sliding-window model, which is what
lets training carry context across segments and decoding run token by token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
from megaret.models.attention_layer import KVCache, SelfAttention
from megaret.models.ffn import FeedForward
from megaret.models.norms import build_norm
from megaret.parallel.context import TensorParallel


@dataclass
class TransformerState:
    """Per-layer caches (KVCache for attention layers, BRTLayerState for recurrent ones; None
    before the first call) and the absolute position of the next token."""

    layers: list[Any]
    position: int

    def detach(self) -> TransformerState:
        """Stop gradients at the segment boundary (truncated backpropagation through time)."""
        return TransformerState([None if s is None else s.detach() for s in self.layers], self.position)


@dataclass
class TransformerOutput:
    logits: torch.Tensor  # (B, T, V / tp): this rank's vocabulary slice
    loss: torch.Tensor | None  # (B, T) per-token cross-entropy when labels are given
    state: TransformerState


class TransformerBlock(nn.Module):
    """x + Attn(LN(x)), then + FFN(LN(.)), each branch with dropout."""

    def __init__(self, cfg: ModelConfig, config: TransformerConfig, tp: TensorParallel,
                 window: int | None) -> None:
        super().__init__()
        self.attention_norm = build_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)
        self.attention = SelfAttention(cfg.hidden_size, cfg.num_heads, config, tp, window=window,
                                       rotary_base=cfg.rotary_base)
        self.ffn_norm = build_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)
        self.ffn = FeedForward(cfg.hidden_size, cfg.ffn_hidden_size, cfg.ffn_type, config, tp)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None, position: int,
                reset: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """x: (T, B, d) -> ((T, B, d), this layer's cache); reset (B,) drops a sample's history."""
        if cache is not None:
            cache = cache.reset(reset)
        y, cache = self.attention(self.attention_norm(x), cache, position)
        x = x + self.dropout(y)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x, cache


class Transformer(nn.Module):
    """Token ids in, vocab-parallel logits (and per-token loss) out, with carried caches.

    arch 'transformer': full causal attention; 'sliding': every layer block-windowed with
    window model.block_size. Subclasses (BRT) replace layers through `build_layer`.
    """

    def __init__(self, cfg: ModelConfig, config: TransformerConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.cfg = cfg
        self.config = config  # megatron-core schedules read model.config
        self.tp = tp
        self.window = None if cfg.arch == "transformer" else cfg.block_size
        self.embedding = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, init_method=config.init_method, config=config, tp_group=tp.group
        )
        self.layers = nn.ModuleList(self.build_layer(i, config) for i in range(cfg.num_layers))
        self.final_norm = build_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)
        self.output = ColumnParallelLinear(
            cfg.hidden_size, cfg.vocab_size, config=config, init_method=config.init_method, bias=False,
            gather_output=False, skip_weight_param_allocation=cfg.tie_embeddings, tp_group=tp.group,
        )
        self.dropout = nn.Dropout(cfg.dropout)

    @property
    def carries_state(self) -> bool:
        """Whether training should hand the state to the next segment: the windowed caches (and
        BRT states) are bounded; the causal Transformer's cache grows with every call, so it is
        for decoding only."""
        return self.window is not None

    def build_layer(self, index: int, config: TransformerConfig) -> nn.Module:
        return TransformerBlock(self.cfg, config, self.tp, self.window)

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        state: TransformerState | None = None,
        reset: torch.Tensor | None = None,
    ) -> TransformerOutput:
        """tokens: (B, T) int ids; labels: (B, T) or None; state: from a previous call;
        reset: (B,) bool, True where a sample starts a new document with this call (its
        carried history is dropped; a recurrent layer restores its learned initial state)."""
        position = 0 if state is None else state.position
        layer_states = [None] * len(self.layers) if state is None else state.layers
        if len(layer_states) != len(self.layers):
            raise ValueError(f"state has {len(layer_states)} layers; this model has {len(self.layers)}")
        x = self.dropout(self.embedding(tokens.t().contiguous()))  # (T, B, d)
        new_states = []
        for layer, layer_state in zip(self.layers, layer_states, strict=True):
            x, s = layer(x, layer_state, position, reset)
            new_states.append(s)
        x = self.final_norm(x)
        weight = self.embedding.weight if self.cfg.tie_embeddings else None
        logits, _ = self.output(x, weight=weight)  # (T, B, V / tp)
        loss = None
        if labels is not None:
            # The softmax runs in fp32 (or fp64 when the model does) whatever the activations.
            ce_logits = logits if logits.dtype == torch.float64 else logits.float()
            loss = vocab_parallel_cross_entropy(ce_logits, labels.t().contiguous()).t()  # (B, T)
        next_state = TransformerState(new_states, position + tokens.shape[1])
        return TransformerOutput(logits.transpose(0, 1), loss, next_state)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, T, V / tp) -> (B, T, V): the full vocabulary, gathered over the TP group."""
        return gather_from_tensor_model_parallel_region(logits, group=self.tp.group)
