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

import torch
from megatron.core.transformer import TransformerConfig
from torch import nn

from megaret.config import ModelConfig
from megaret.models.attention_layer import KVCache, SelfAttention
from megaret.models.brt_layer import BRTLayerState
from megaret.models.dropout import ResidualDropout
from megaret.models.ffn import FeedForward
from megaret.models.norms import build_norm
from megaret.models.stage import StagedLanguageModel
from megaret.models.state import StackState
from megaret.parallel.attention_cp import gather_sequence
from megaret.parallel.context import NO_CP, ContextParallel, TensorParallel


class TransformerState(StackState):
    """Per-layer caches (KVCache for attention layers, BRTLayerState for recurrent ones; None
    before the first call) and the absolute position of the next token."""

    layer_types = (KVCache, BRTLayerState)

    def reserve(self, capacity: int) -> TransformerState:
        """Room for `capacity` tokens in every growing KV cache (decoding; see KVCache.reserve)."""
        return TransformerState([s.reserve(capacity) if isinstance(s, KVCache) else s for s in self.layers],
                                self.position)


class TransformerBlock(nn.Module):
    """x + Attn(LN(x)), then + FFN(LN(.)), each branch with dropout."""

    def __init__(self, cfg: ModelConfig, config: TransformerConfig, tp: TensorParallel,
                 window: int | None, cp: ContextParallel = NO_CP) -> None:
        super().__init__()
        self.attention_norm = build_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)
        self.attention = SelfAttention(cfg.hidden_size, cfg.num_heads, config, tp, window=window,
                                       rotary_base=cfg.rotary_base, cp=cp)
        self.ffn_norm = build_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)
        self.ffn = FeedForward(cfg.hidden_size, cfg.ffn_hidden_size, cfg.ffn_type, config, tp)
        self.dropout = ResidualDropout(cfg.dropout, config.sequence_parallel and tp.size > 1)

    def forward(self, x: torch.Tensor, cache: KVCache | None, position: int,
                doc: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """x: (T, B, d) -> ((T, B, d), this layer's cache); doc (B, T) document ids inside the
        call (0 continues the cache's document; see StagedLanguageModel.forward)."""
        y, cache = self.attention(self.attention_norm(x), cache, position, doc)
        x = x + self.dropout(y)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x, cache


class Transformer(StagedLanguageModel):
    """Token ids in, vocab-parallel logits (and per-token loss) out, with carried caches.

    Without a window: full causal attention (arch 'transformer'); with one: every layer
    block-windowed (arch 'sliding'). Subclasses (BRT) replace layers through `build_layer`. As one
    pipeline stage (see StagedLanguageModel), a non-last stage returns its hidden states.
    """

    def __init__(self, cfg: ModelConfig, config: TransformerConfig, tp: TensorParallel, *,
                 window: int | None = None, **stage) -> None:
        """window: None for full causal attention, else the block length of block-windowed
        attention (the arch spec passes model.block_size); stage: pre_process / post_process /
        layers (global indices), for one pipeline stage."""
        self.window = window  # read by build_layer
        super().__init__(cfg, config, tp, **stage)

    @property
    def carries_state(self) -> bool:
        """Whether training should hand the state to the next segment: the windowed caches (and
        BRT states) are bounded; the causal Transformer's cache grows with every call, so it is
        for decoding only."""
        return self.window is not None

    state_type = TransformerState

    def build_layer(self, index: int, config: TransformerConfig) -> nn.Module:
        return TransformerBlock(self.cfg, config, self.tp, self.window, self.cp)

    def layer_inputs(self, doc_start: torch.Tensor | None, retention_mode: str | None) -> tuple:
        """(doc,): (B, T) document ids, 0 continuing the carried history, each start opening the
        next id (None without doc_start). Under context parallelism the causal Transformer's ids
        are the whole sequence's (Ulysses attends to it); the sliding arch's are its slice's, 0
        continuing the previous rank's last document (its halo; megaret/parallel/attention_cp.py)."""
        if retention_mode is not None:
            raise ValueError(f"retention_mode={retention_mode!r} applies to model.arch=retnet only")
        if doc_start is not None and self.cp.size > 1 and self.window is None:
            doc_start = gather_sequence(doc_start, self.cp)  # (B, T): Ulysses attends the whole sequence
        return (None if doc_start is None else doc_start.long().cumsum(dim=1),)
