"""Transformer baselines: a causal Transformer and a sliding-window (block-windowed) one.

Pre-norm blocks with the same embeddings, FFN, norms and vocab-parallel head as RetNet,
so the archs differ only in their token mixer. Activations run sequence-first, (T, B, d).
Both carry a per-layer KV cache: all keys for the causal Transformer (decoding), the
previous block (plus the current partial one) for the sliding-window model, which is what
lets training carry context across segments and decoding run token by token.

Like RetNet, a model can be one pipeline stage (megaret/models/stage.py): every part is
initialised from its own seed, so a stage's weights equal the same part of the full model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.transformer import TransformerConfig
from torch import nn

from megaret.config import ModelConfig
from megaret.models.attention_layer import KVCache, SelfAttention
from megaret.models.ffn import FeedForward
from megaret.models.norms import build_norm
from megaret.models.stage import StagedLanguageModel
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
                reset: torch.Tensor | None = None, doc: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, KVCache]:
        """x: (T, B, d) -> ((T, B, d), this layer's cache); reset (B,) drops a sample's history;
        doc (B, T) document ids inside the call (see Transformer.forward)."""
        if cache is not None:
            cache = cache.reset(reset)
        y, cache = self.attention(self.attention_norm(x), cache, position, doc)
        x = x + self.dropout(y)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x, cache


class Transformer(StagedLanguageModel):
    """Token ids in, vocab-parallel logits (and per-token loss) out, with carried caches.

    arch 'transformer': full causal attention; 'sliding': every layer block-windowed with
    window model.block_size. Subclasses (BRT) replace layers through `build_layer`. As one
    pipeline stage (see StagedLanguageModel), a non-last stage returns its hidden states.
    """

    def __init__(self, cfg: ModelConfig, config: TransformerConfig, tp: TensorParallel, **stage) -> None:
        """stage: pre_process / post_process / layers (global indices), for one pipeline stage."""
        self.window = None if cfg.arch == "transformer" else cfg.block_size  # read by build_layer
        super().__init__(cfg, config, tp, **stage)

    @property
    def carries_state(self) -> bool:
        """Whether training should hand the state to the next segment: the windowed caches (and
        BRT states) are bounded; the causal Transformer's cache grows with every call, so it is
        for decoding only."""
        return self.window is not None

    state_type = TransformerState
    output_type = TransformerOutput

    def build_layer(self, index: int, config: TransformerConfig) -> nn.Module:
        return TransformerBlock(self.cfg, config, self.tp, self.window)

    def forward(
        self,
        tokens: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        state: TransformerState | None = None,
        reset: torch.Tensor | None = None,
        return_state: bool = False,
        doc_start: torch.Tensor | None = None,
    ) -> TransformerOutput | torch.Tensor | tuple[torch.Tensor, TransformerState]:
        """tokens: (B, T) int ids (ignored by a non-first stage); labels: (B, T) or None;
        state: from a previous call; reset: (B,) bool, True where a sample starts a new
        document with this call (its carried history is dropped; a recurrent layer restores
        its learned initial state). A non-last stage returns its hidden states (T, B, d), or
        (hidden, the state of its layers) with return_state (stateful training under a pipeline).
        doc_start: (B, T) bool or None: True where a document starts inside the sample (packed
        samples): no token attends across a document start, and a recurrent layer restores its
        initial state there, so packed documents equal their separate runs (exactly for the
        causal Transformer; for the block-windowed archs when documents start on block
        boundaries, since a separate run would align its blocks to the document's start)."""
        # (B, T) document ids: 0 continues the carried history, each start opens the next id
        doc = None if doc_start is None else doc_start.long().cumsum(dim=1)
        return self.run_stack(tokens, labels, state, return_state, reset, doc)
