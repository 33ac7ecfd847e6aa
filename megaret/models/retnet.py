"""RetNet: a stack of pre-norm retention blocks on megatron-core tensor-parallel layers.

Activations run sequence-first, (T, B, d), as megatron-core's layers (and its sequence
parallelism) expect. The model takes its tensor-parallel group as an argument and
contains no launch or process-group plumbing.

A model can also be one pipeline stage (`pre_process`: the embedding, `post_process`: final
norm, output layer and loss, `layers`: the global indices of the blocks it holds). Every
part is initialised from its own seed (drawn once from torch's generator, then offset by
the part's global index), so a stage's weights equal the same part of the full model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
    vocab_parallel_cross_entropy,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import ModelType
from torch import nn

from megaret.config import ModelConfig
from megaret.models.ffn import FeedForward
from megaret.models.norms import RMSNorm, build_norm
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

    def forward(self, x: torch.Tensor, state: torch.Tensor | None, position: int, mode: str,
                doc_start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (T, B, d) -> ((T, B, d), this layer's new retention state)."""
        y, new_state = self.retention(self.retention_norm(x), state, position, mode, doc_start)
        x = x + self.dropout(y)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x, new_state


def stage_layers(num_layers: int, pp_size: int, pp_rank: int, vp_size: int = 1, vp_rank: int = 0
                 ) -> tuple[list[int], bool, bool]:
    """(global layer indices, pre_process, post_process) of one pipeline model chunk.

    Megatron's interleaved layout: virtual stage s = vp_rank * pp_size + pp_rank holds the
    s-th contiguous slice of num_layers / (pp_size * vp_size) layers.
    """
    stages = pp_size * vp_size
    if num_layers % stages:
        raise ValueError(f"model.num_layers={num_layers} is not divisible by pipeline*virtual={stages}")
    per = num_layers // stages
    s = vp_rank * pp_size + pp_rank
    return list(range(s * per, (s + 1) * per)), s == 0, s == stages - 1


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module with torch's CPU generator at `seed`, leaving the global state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class RetNet(nn.Module):
    """Token ids in, vocab-parallel logits (and per-token loss) out, with carried state.

    As one pipeline stage: without `pre_process` the input is the tensor given to
    `set_input_tensor` (what megatron's schedules do); without `post_process` forward
    returns the hidden states (T, B, d) for the next stage instead of a RetNetOutput.
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
        self.input_tensor: torch.Tensor | None = None
        # One seed per part: the same part gets the same weights on whichever stage holds it.
        base = int(torch.randint(2**31, (1,), device="cpu").item()) * 1000
        self.embedding = _seeded(base, lambda: VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, init_method=config.init_method, config=config, tp_group=tp.group
        )) if pre_process else None
        self.layers = nn.ModuleList(
            _seeded(base + 1 + i, lambda: RetNetBlock(cfg, config, tp)) for i in self.layer_numbers
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
        # Sequence parallelism (megatron's): between the embedding and the output layer the
        # activations are split along T over the TP ranks; the norms then see one shard each,
        # so their gradients are partial sums, summed over TP before the optimizer step (the
        # trainer looks for this tag, as megatron's finalize_model_grads does).
        self.sequence_parallel = bool(config.sequence_parallel) and tp.size > 1
        if self.sequence_parallel:
            for module in self.modules():
                if isinstance(module, nn.LayerNorm | RMSNorm):
                    for p in module.parameters():
                        p.sequence_parallel = True
        self.recompute = False  # activation recomputation per block (set by the trainer)

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor | None] | None) -> None:
        """Megatron's schedules hand a non-first stage its input (T, B, d) here before forward."""
        if isinstance(input_tensor, list | tuple):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def forward(
        self,
        tokens: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        state: RetNetState | None = None,
        mode: str | None = None,
        doc_start: torch.Tensor | None = None,
    ) -> RetNetOutput | torch.Tensor:
        """tokens: (B, T) int ids (ignored by a non-first stage); labels: (B, T) or None;
        state: from a previous call. A non-last stage returns its hidden states (T, B, d).
        doc_start: (B, T) bool or None: True where a document starts inside the sample; every
        layer's retention state is zeroed just before it, so packed documents do not see each
        other (rotary positions run on: retention depends only on positions within a document)."""
        mode = mode or self.cfg.retention_mode
        position = 0 if state is None else state.position
        layer_states = [None] * len(self.layers) if state is None else state.layers
        if len(layer_states) != len(self.layers):
            raise ValueError(f"state has {len(layer_states)} layers; this model has {len(self.layers)}")
        if self.pre_process:
            x = self.embedding(tokens.t().contiguous())  # (T, B, d)
            if self.sequence_parallel:
                x = scatter_to_sequence_parallel_region(x, group=self.tp.group)  # (T / tp, B, d)
            x = self.dropout(x)
        else:
            if self.input_tensor is None:
                raise ValueError("a stage without pre_process needs set_input_tensor(hidden) before forward")
            x = self.input_tensor  # (T, B, d) from the previous stage
        new_states = []
        for layer, layer_state in zip(self.layers, layer_states, strict=True):
            if self.recompute and torch.is_grad_enabled():
                # keep only the block's input; recompute its activations in the backward
                x, s = tensor_parallel.checkpoint(
                    lambda h, st, layer=layer: layer(h, st, position, mode, doc_start), False, x, layer_state)
            else:
                x, s = layer(x, layer_state, position, mode, doc_start)
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
        next_state = RetNetState(new_states, position + length)
        return RetNetOutput(logits.transpose(0, 1), loss, next_state)

    def global_name(self, name: str) -> str:
        """A parameter name of this stage -> its name in the full model (layers.<global index>...)."""
        if name.startswith("layers."):
            _, local, rest = name.split(".", 2)
            return f"layers.{self.layer_numbers[int(local)]}.{rest}"
        return name

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, T, V / tp) -> (B, T, V): the full vocabulary, gathered over the TP group."""
        return gather_from_tensor_model_parallel_region(logits, group=self.tp.group)

    def init_state(self, batch_size: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | None = None) -> RetNetState:
        """Zero states: equivalent to starting a fresh sequence."""
        first = self.layers[0].retention
        shape = (batch_size, first.local_heads, first.key_dim, first.value_dim)
        return RetNetState([torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers], 0)
