"""What every megaret language model shares, as a whole model or as one pipeline stage.

RetNet and the Transformer family (causal, sliding-window, BRT) differ only in their blocks;
this base holds the rest once: the vocab-parallel embedding and output layer with the loss,
layers built by GLOBAL index, per-part seeding (so a stage's weights equal the same part of
the full model), megatron's stage hooks (`set_input_tensor`, `model_type`, `config`),
sequence-parallel tagging of the norms, and per-layer activation recomputation.

Activations run sequence-first, (T, B, d), as megatron-core's layers (and its sequence
parallelism) expect.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
from megaret.models.dropout import ResidualDropout
from megaret.models.norms import RMSNorm, build_norm
from megaret.parallel.context import NO_CP, ContextParallel, TensorParallel


@dataclass
class ModelOutput:
    """What the last stage of every arch returns."""

    logits: torch.Tensor  # (B, T, V / tp): this rank's vocabulary slice
    loss: torch.Tensor | None  # (B, T) per-token cross-entropy when labels are given
    state: Any  # the arch's state_type (the state protocol, megaret/models/state.py)


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module with torch's CPU generator at `seed`, leaving the global state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class StagedLanguageModel(nn.Module):
    """Token ids in, vocab-parallel logits (and per-token loss) out; subclasses give the blocks.

    As one pipeline stage: without `pre_process` the input is the tensor given to
    `set_input_tensor` (what megatron's schedules do); without `post_process` the subclass's
    forward returns the hidden states (T, B, d) for the next stage.

    Sequence parallelism (megatron's, config.sequence_parallel with TP > 1): between the
    embedding and the output layer the activations are split along T over the TP ranks, so the
    norms on that path see one shard each and their gradients are partial sums; they are tagged
    `sequence_parallel` and summed over TP before the optimizer step (as megatron's
    finalize_model_grads does). A norm whose input is whole on every rank (BRT's state path)
    is marked `replicated_input` and left untagged.
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
        cp: ContextParallel = NO_CP,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.cp = cp  # context parallel: this rank holds slice cp.rank of every sample (RetNet)
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
        self.embedding = seeded(base, lambda: VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, init_method=config.init_method, config=config, tp_group=tp.group
        )) if pre_process else None
        self.layers = nn.ModuleList(
            seeded(base + 1 + i, lambda i=i: self.build_layer(i, config)) for i in self.layer_numbers
        )
        if post_process:
            self.final_norm = build_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)
            self.output = seeded(base + 1 + cfg.num_layers, lambda: ColumnParallelLinear(
                cfg.hidden_size, cfg.vocab_size, config=config, init_method=config.init_method, bias=False,
                gather_output=False, skip_weight_param_allocation=cfg.tie_embeddings, tp_group=tp.group,
            ))
        else:
            self.final_norm = self.output = None
        self.sequence_parallel = bool(config.sequence_parallel) and tp.size > 1
        self.dropout = ResidualDropout(cfg.dropout, self.sequence_parallel)  # on the embedding's output
        if self.sequence_parallel:
            for module in self.modules():
                norm = isinstance(module, nn.LayerNorm | RMSNorm)
                if norm and not getattr(module, "replicated_input", False):
                    for p in module.parameters():
                        p.sequence_parallel = True
        self.recompute = False  # activation recomputation per layer (set by the trainer)

    state_type: type  # (per-layer states, next position) -> what forward returns as .state

    def build_layer(self, index: int, config: TransformerConfig) -> nn.Module:
        """The block at global layer `index`."""
        raise NotImplementedError

    # -- megatron's stage hooks and names ------------------------------------------------------

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

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, T, V / tp) -> (B, T, V): the full vocabulary, gathered over the TP group."""
        return gather_from_tensor_model_parallel_region(logits, group=self.tp.group)

    # -- the pieces of a forward -------------------------------------------------------------

    def embed(self, tokens: torch.Tensor | None) -> torch.Tensor:
        """tokens (B, T) -> (T, B, d) ((T / tp, B, d) under sequence parallelism); a non-first
        stage returns what `set_input_tensor` gave it instead."""
        if not self.pre_process:
            if self.input_tensor is None:
                raise ValueError("a stage without pre_process needs set_input_tensor(hidden) before forward")
            return self.input_tensor
        x = self.embedding(tokens.t().contiguous())  # (T, B, d)
        if self.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, group=self.tp.group)  # (T / tp, B, d)
        return self.dropout(x)

    def sequence_length(self, tokens: torch.Tensor | None, x: torch.Tensor) -> int:
        """The full T of this call, also on a sequence-parallel shard (T / tp, B, d)."""
        if tokens is not None:
            return tokens.shape[1]
        return x.shape[0] * (self.tp.size if self.sequence_parallel else 1)

    def run_layer(self, layer: nn.Module, x: torch.Tensor, *args: Any) -> tuple[torch.Tensor, Any]:
        """layer(x, *args) -> (x, the layer's new state); with recompute (training), only x is
        kept and the layer's activations are recomputed in the backward (megatron's checkpoint).
        The state a recomputed layer returns carries no gradient: the trainer detaches carried
        states anyway (truncated backpropagation through time)."""
        if not (self.recompute and torch.is_grad_enabled()):
            return layer(x, *args)
        box: dict[str, Any] = {}

        def hidden_only(h: torch.Tensor) -> torch.Tensor:
            y, box["state"] = layer(h, *args)
            return y

        return tensor_parallel.checkpoint(hidden_only, False, x), box["state"]

    def layer_inputs(self, doc_start: torch.Tensor | None, retention_mode: str | None) -> tuple:
        """The arguments every block of this arch takes after (x, its state, position)."""
        raise NotImplementedError

    def forward(
        self,
        tokens: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        *,
        state: Any = None,
        restart: torch.Tensor | None = None,
        doc_start: torch.Tensor | None = None,
        retention_mode: str | None = None,
        return_state: bool = False,
    ) -> Any:
        """The one forward of every arch.

        tokens: (B, T) int ids (ignored by a non-first stage); labels: (B, T) or None.
        state: the `state_type` a previous call returned (None: a fresh sequence).
        restart: (B,) bool or None: True where a sample starts a new document with this call; its
            carried history is dropped (`state.reset(restart)`: a zero retention state, an
            emptied cache, BRT's learned initial state).
        doc_start: (B, T) bool or None: True where a document starts INSIDE the sample (packed
            samples): no token mixes across a document start (exactly as separate runs for
            RetNet and the causal Transformer; for the block-windowed archs when documents
            start on block boundaries, since a separate run aligns its blocks to its start).
        retention_mode: the retention form of this call, 'parallel' | 'chunk' | 'recurrent'
            (RetNet only; default model.retention_mode; a one-token call is always one O(1) step).
        return_state: on a non-last stage, return (hidden, the state of its layers) (stateful
            training under a pipeline).
        Returns a `ModelOutput` (logits (B, T, V / tp), per-token loss (B, T) or None, next
        state) on the last stage; otherwise the hidden states (T, B, d) (or with the state).
        """
        if state is not None and restart is not None:
            state = state.reset(restart)
        layer_args = self.layer_inputs(doc_start, retention_mode)
        return self.run_stack(tokens, labels, state, return_state, *layer_args)

    def run_stack(self, tokens: torch.Tensor | None, labels: torch.Tensor | None, state: Any,
                  return_state: bool, *layer_args: Any) -> Any:
        """Embed (or take the previous stage's hidden states), run this stage's layers, each as
        layer(x, its state, position, *layer_args), and finish (see `forward`)."""
        start = 0 if state is None else state.position  # the sequence's, also under context parallelism
        x = self.embed(tokens)  # (T, B, d), or (T / tp, B, d) under sequence parallelism
        t_local = self.sequence_length(tokens, x)  # this rank's slice of the sequence (all of it at CP=1)
        position = start + self.cp.rank * t_local  # rotary angles stay global: slice r starts r * T_r in
        layer_states = [None] * len(self.layers) if state is None else state.layers
        if len(layer_states) != len(self.layers):
            raise ValueError(f"state has {len(layer_states)} layers; this model has {len(self.layers)}")
        new_states = []
        for layer, layer_state in zip(self.layers, layer_states, strict=True):
            x, s = self.run_layer(layer, x, layer_state, position, *layer_args)
            new_states.append(s)
        next_state = self.state_type(new_states, start + self.cp.size * t_local)
        if not self.post_process:
            return (x, next_state) if return_state else x
        logits, loss = self.head(x, labels)
        return ModelOutput(logits, loss, next_state)

    def mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """-inf at the padded ids (model.tokenizer_vocab_size and above) of this rank's vocabulary
        slice (T, B, V / tp): they take no softmax mass in the loss and are never sampled."""
        n, V = self.cfg.tokenizer_vocab_size, self.cfg.vocab_size
        if n is None or n >= V:
            return logits
        width = logits.shape[-1]
        first = self.tp.rank * width  # global id of this slice's first column
        if first + width <= n:
            return logits
        padded = torch.arange(first, first + width, device=logits.device) >= n  # (V / tp,)
        return logits.masked_fill(padded, float("-inf"))

    def head(self, x: torch.Tensor, labels: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(T, B, d) -> logits (B, T, V / tp) and, with labels (B, T), the per-token loss (B, T)."""
        x = self.final_norm(x)
        weight = self.embedding.weight if self.cfg.tie_embeddings else None
        logits, _ = self.output(x, weight=weight)  # (T, B, V / tp); gathers T under SP
        logits = self.mask_padding(logits)
        loss = None
        if labels is not None:
            # The softmax runs in fp32 (or fp64 when the model does) whatever the activations.
            ce_logits = logits if logits.dtype == torch.float64 else logits.float()
            loss = vocab_parallel_cross_entropy(ce_logits, labels.t().contiguous()).t()  # (B, T)
        return logits.transpose(0, 1), loss
