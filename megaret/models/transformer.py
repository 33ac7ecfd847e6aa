"""Transformer baselines: a causal Transformer and a sliding-window (block-windowed) one.

Pre-norm blocks with the same embeddings, FFN, norms and vocab-parallel head as RetNet,
so the archs differ only in their token mixer. Activations run sequence-first, (T, B, d).
Both carry a per-layer KV cache: all keys for the causal Transformer (decoding), the
previous block (plus the current partial one) for the sliding-window model, which is what
lets training carry context across segments and decoding run token by token.

Like RetNet, a model can be one pipeline stage (`pre_process`, `post_process`, `layers`: global
block indices); every part is initialised from its own seed, so a stage's weights equal the
same part of the full model, and a non-last stage returns its hidden states (T, B, d).
"""

from __future__ import annotations

from collections.abc import Sequence
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
from megatron.core.transformer.enums import ModelType
from torch import nn

from megaret.config import ModelConfig
from megaret.models.attention_layer import KVCache, SelfAttention
from megaret.models.ffn import FeedForward
from megaret.models.norms import build_norm
from megaret.models.retnet import _seeded
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

    As one pipeline stage: without `pre_process` the input is the tensor given to
    `set_input_tensor` (what megatron's schedules do); without `post_process` forward returns
    the hidden states (T, B, d) for the next stage instead of a TransformerOutput.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        config: TransformerConfig,
        tp: TensorParallel,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.config = config  # megatron-core schedules read model.config
        self.model_type = ModelType.encoder_or_decoder  # ... and model.model_type
        self.tp = tp
        self.pre_process = pre_process
        self.post_process = post_process
        self.layer_numbers = list(range(cfg.num_layers)) if layers is None else list(layers)
        if any(not 0 <= i < cfg.num_layers for i in self.layer_numbers):
            raise ValueError(f"layers={self.layer_numbers} must lie in [0, {cfg.num_layers})")
        if cfg.tie_embeddings and not (pre_process and post_process):
            raise ValueError("model.tie_embeddings=true needs the embedding and output layer on one "
                             "stage; set model.tie_embeddings=false or parallel.pipeline=1")
        self.window = None if cfg.arch == "transformer" else cfg.block_size
        self.input_tensor: torch.Tensor | None = None
        # One seed per part: the same part gets the same weights on whichever stage holds it.
        base = int(torch.randint(2**31, (1,), device="cpu").item()) * 1000
        self.embedding = _seeded(base, lambda: VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, init_method=config.init_method, config=config, tp_group=tp.group
        )) if pre_process else None
        self.layers = nn.ModuleList(
            _seeded(base + 1 + i, lambda i=i: self.build_layer(i, config)) for i in self.layer_numbers
        )
        if post_process:
            self.final_norm = build_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)
            self.output = _seeded(base + 1 + cfg.num_layers, lambda: ColumnParallelLinear(
                cfg.hidden_size, cfg.vocab_size, config=config, init_method=config.init_method, bias=False,
                gather_output=False, skip_weight_param_allocation=cfg.tie_embeddings, tp_group=tp.group,
            ))
        else:
            self.final_norm = self.output = None
        self.dropout = nn.Dropout(cfg.dropout)

    @property
    def carries_state(self) -> bool:
        """Whether training should hand the state to the next segment: the windowed caches (and
        BRT states) are bounded; the causal Transformer's cache grows with every call, so it is
        for decoding only."""
        return self.window is not None

    def build_layer(self, index: int, config: TransformerConfig) -> nn.Module:
        return TransformerBlock(self.cfg, config, self.tp, self.window)

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor | None] | None) -> None:
        """Megatron's schedules hand a non-first stage its input (T, B, d) here before forward."""
        if isinstance(input_tensor, list | tuple):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def global_name(self, name: str) -> str:
        """A parameter name of this stage -> its name in the full model (layers.<global index>...)."""
        if name.startswith("layers."):
            _, local, rest = name.split(".", 2)
            return f"layers.{self.layer_numbers[int(local)]}.{rest}"
        return name

    def forward(
        self,
        tokens: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        state: TransformerState | None = None,
        reset: torch.Tensor | None = None,
    ) -> TransformerOutput | torch.Tensor:
        """tokens: (B, T) int ids (ignored by a non-first stage); labels: (B, T) or None;
        state: from a previous call; reset: (B,) bool, True where a sample starts a new
        document with this call (its carried history is dropped; a recurrent layer restores
        its learned initial state). A non-last stage returns its hidden states (T, B, d)."""
        position = 0 if state is None else state.position
        layer_states = [None] * len(self.layers) if state is None else state.layers
        if len(layer_states) != len(self.layers):
            raise ValueError(f"state has {len(layer_states)} layers; this model has {len(self.layers)}")
        if self.pre_process:
            x = self.dropout(self.embedding(tokens.t().contiguous()))  # (T, B, d)
        else:
            if self.input_tensor is None:
                raise ValueError("a stage without pre_process needs set_input_tensor(hidden) before forward")
            x = self.input_tensor  # (T, B, d) from the previous stage
        new_states = []
        for layer, layer_state in zip(self.layers, layer_states, strict=True):
            x, s = layer(x, layer_state, position, reset)
            new_states.append(s)
        if not self.post_process:
            return x
        x = self.final_norm(x)
        weight = self.embedding.weight if self.cfg.tie_embeddings else None
        logits, _ = self.output(x, weight=weight)  # (T, B, V / tp)
        loss = None
        if labels is not None:
            # The softmax runs in fp32 (or fp64 when the model does) whatever the activations.
            ce_logits = logits if logits.dtype == torch.float64 else logits.float()
            loss = vocab_parallel_cross_entropy(ce_logits, labels.t().contiguous()).t()  # (B, T)
        length = tokens.shape[1] if tokens is not None else x.shape[0]
        next_state = TransformerState(new_states, position + length)
        return TransformerOutput(logits.transpose(0, 1), loss, next_state)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, T, V / tp) -> (B, T, V): the full vocabulary, gathered over the TP group."""
        return gather_from_tensor_model_parallel_region(logits, group=self.tp.group)
