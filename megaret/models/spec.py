"""Each arch described once: its spec answers every question the rest of megaret asks of it.

`arch_spec(cfg.model.arch)` gives an `ArchSpec`: how to build the model (class and arguments),
its carried state type, the layers it stacks (each a `LayerKind` that knows its parameters,
FLOPs and attention span), what its carried state covers, how inference must call it, and
the config combinations it refuses. The trainer, inference, metrics, the dry-run planner and
export ask the spec; nothing outside megaret/models branches on the arch.

This module imports no megatron-core (the launcher's dry run reads it): model classes are
imported when a model is built.

FLOPs counting rule (model FLOPs; one forward, per token; training is 3x: the backward costs
twice the forward; recomputation is not counted):
- weight matmuls exactly: 2 x every weight matrix entry applied to the token, the output layer
  included (tied or not), the embedding lookup excluded. A BRT recurrent layer's state-path
  linears run once per block on its S states: they count S / W times per token.
- the mixer (token mixing without weights), per layer, by formula, full score matrices (no
  causal halving), d = hidden size, v = value factor, H = heads:
  - retention: 2 C d (1 + v) + 4 v d^2 / H, C = model.chunk_size (chunk form), the sequence
    (parallel form) or 0 (recurrent form): q.k over C keys, times V; q.S and the k^T v update;
  - attention: 4 L d, L the span a query attends: the sequence (causal) or 2W (a block window:
    the previous and the current block of W = model.block_size);
  - BRT recurrent layer: its windowed token self-attention 4 (2W) d, token -> state cross-
    attention 4 S d, and per block the state self-attention (S x S) and state -> token cross-
    attention (S x W): 4 d (2W + 2S + S^2 / W).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from megaret.config.schema import ARCHS, Config, ModelConfig

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig
    from torch import nn

    from megaret.models.fused import FusedRows
    from megaret.parallel.context import TensorParallel


# ---------------------------------------------------------------------------------------------
# layers


def norm_params(m: ModelConfig) -> int:
    return 2 * m.hidden_size if m.norm_type == "layernorm" else m.hidden_size


def ffn_params(m: ModelConfig) -> int:
    """Up (and SwiGLU gate) d -> f and down f -> d, no biases."""
    return (3 if m.ffn_type == "swiglu" else 2) * m.hidden_size * m.ffn_hidden_size


def gate_params(m: ModelConfig, in_features: int) -> tuple[int, int]:
    """(weights, biases) of a BRT gate: fixed W_z (in x d), b_z, b_g; lstm W_z/W_i/W_f (in x 3d)
    and their biases."""
    d = m.hidden_size
    return (in_features * d, 2 * d) if m.gate_type == "fixed" else (3 * in_features * d, 3 * d)


@dataclass(frozen=True)
class LayerKind:
    """One kind of block. sharded / replicated: parameters split over TP / whole on every TP
    rank; matmul: weight entries applied per token (the weight-matmul FLOPs are twice it)."""

    name: str
    sharded: int
    replicated: int
    matmul: float
    mixer: float  # forward FLOPs per token of the weightless token mixing (module docstring)
    span: int  # keys each query's scores span in memory (activation estimate)

    @property
    def params(self) -> int:
        return self.sharded + self.replicated


def retention_layer(m: ModelConfig, seq_length: int) -> LayerKind:
    """RetNet block: W_Q, W_K (d x d), W_V, W_G (d x vd), W_O (vd x d), the FFN, two norms."""
    d, v = m.hidden_size, m.value_factor
    weights = (2 + 3 * v) * d * d + ffn_params(m)
    c = {"chunk": min(m.chunk_size, seq_length), "parallel": seq_length, "recurrent": 0}[m.retention_mode]
    mixer = 2 * c * d * (1 + v) + 4 * v * d * d / m.num_heads
    span = min(m.chunk_size, seq_length) if m.retention_mode == "chunk" else seq_length
    return LayerKind("retention", weights, 2 * norm_params(m), weights, mixer, span)


def attention_layer(m: ModelConfig, seq_length: int, window: int | None) -> LayerKind:
    """Transformer block: W_Q, W_K, W_V, W_O (4 d^2), the FFN, two norms; full causal
    attention (window None) or block-windowed."""
    d = m.hidden_size
    weights = 4 * d * d + ffn_params(m)
    span = seq_length if window is None else min(2 * window, seq_length)
    return LayerKind("attention" if window is None else "window", weights, 2 * norm_params(m), weights,
                     4 * span * d, span)


def recurrent_layer(m: ModelConfig, seq_length: int) -> LayerKind:
    """A BRT recurrent layer.

    Tokens: self-attention q, shared k/v, cross q (4 d^2), W_o over [self; cross] (2 d^2), FFN,
    two norms. States: self q, cross q, shared k/v (4 d^2), a norm, the gate over the
    concatenated attentions (2d in), S x d state IDs and initial state; unless state_skip, a
    norm, the MLP up projection(s) and a second gate whose W_z is the MLP's down projection.
    Plus a learned scale per head for each of the four query sets.
    """
    d, f, s, w = m.hidden_size, m.ffn_hidden_size, m.num_states, m.block_size
    gate_w, gate_b = gate_params(m, 2 * d)
    tokens = 6 * d * d + ffn_params(m)
    states = 4 * d * d + gate_w
    norms = 3
    if not m.state_skip:
        up = (2 if m.ffn_type == "swiglu" else 1) * d * f
        mlp_gate_w, mlp_gate_b = gate_params(m, f)
        states += up + mlp_gate_w
        gate_b += mlp_gate_b
        norms += 1
    sharded = tokens + states + gate_b + 4 * m.num_heads
    replicated = norms * norm_params(m) + 2 * s * d
    span = min(2 * w, seq_length)
    mixer = 4 * d * (span + 2 * s + s * s / w)
    return LayerKind("recurrent", sharded, replicated, tokens + states * s / w, mixer, span)


# ---------------------------------------------------------------------------------------------
# the spec


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per token: weight matmuls and the weightless mixer (module docstring)."""

    weights: float
    mixer: float

    @property
    def forward(self) -> float:
        return self.weights + self.mixer

    @property
    def training(self) -> float:
        return 3.0 * self.forward


@dataclass(frozen=True)
class Refusal:
    """A config combination the arch cannot train: `check(cfg)` returns the one-line reason and
    fix when it applies (else None); `example` is a dotted override list that triggers it
    (on the arch's tiny config; the tests iterate them)."""

    check: Callable[[Config], str | None]
    example: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_class: str  # "module:Class", imported when a model is built
    layers: Callable[[ModelConfig, int], list[LayerKind]]  # (model, seq_length) -> one kind per layer
    build_kwargs: Callable[[ModelConfig], dict[str, Any]] = lambda m: {}
    # tokens of history the carried state covers (None: unbounded, a cache that grows with every
    # call, which training cannot carry across steps)
    carried_span: Callable[[ModelConfig], int | None] = lambda m: None
    call_multiple: Callable[[ModelConfig], int] = lambda m: 1  # calls must hold a multiple of this
    prefill_form: str | None = None  # retention_mode of prompt / evaluation calls
    step_form: str | None = None  # retention_mode of one-token decoding calls
    # the carried state keeps its shapes from one decoding step to the next, so a step can be
    # captured once as a CUDA graph and replayed (megaret/infer/cuda_graph.py)
    fixed_step_state: bool = False
    # the transformers class that computes this model exactly (`megaret.export --format hf` writes it
    # with no remote code), or None: the standalone modeling code of megaret/hf/modeling
    hf_native_class: Callable[[ModelConfig], str | None] = lambda m: None
    refusals: tuple[Refusal, ...] = ()
    # the attention forms its layers run (README "Attention kernels"; the kernels are
    # megaret.ops.attention_backend's choice): "causal" (SDPA is_causal), "block_window" (blocks
    # folded into SDPA's batch under causal_lower_right), "brt_state" (BRT's state <-> token
    # attention); each with document masks on FlexAttention on CUDA
    attention: tuple[str, ...] = ()
    # the model.* fields that define the trained function (its weights' shapes and meaning): a
    # checkpoint records them and resuming with another value is refused (megaret.checkpoint.identity);
    # the others (chunk_size, retention_mode, dropout, init_std, ...) are how it is computed or trained
    identity_fields: tuple[str, ...] = ()
    # weights that fuse several projections into one GEMM (megaret.models.fused.FusedRows, names
    # relative to a layer): checkpoints saved with the separate projections are converted by them
    # (megaret.checkpoint.upgrade), the HF export splits them for the standalone modeling code
    fused_weights: Callable[[ModelConfig], tuple[FusedRows, ...]] = lambda m: ()

    # -- building ------------------------------------------------------------------------------

    def build(self, m: ModelConfig, config: TransformerConfig, tp: TensorParallel, **stage: Any) -> nn.Module:
        """The model (or one pipeline stage: pre_process / post_process / layers)."""
        return _load(self.model_class)(m, config, tp, **self.build_kwargs(m), **stage)

    @property
    def state_class(self) -> type:
        """The carried state type (the state protocol, megaret/models/state.py): the model class's own."""
        return _load(self.model_class).state_type

    # -- counting ------------------------------------------------------------------------------

    def param_count(self, m: ModelConfig) -> int:
        """Exact parameters of the full model (all TP shards together)."""
        return sum(k.params for k in self.layers(m, 1)) + shell_params(m)

    def flops_per_token(self, m: ModelConfig, seq_length: int) -> FlopCount:
        """Forward FLOPs per token under the module's counting rule."""
        kinds = self.layers(m, seq_length)
        weights = 2 * (sum(k.matmul for k in kinds) + m.vocab_size * m.hidden_size)
        return FlopCount(weights, sum(k.mixer for k in kinds))

    # -- checking ------------------------------------------------------------------------------

    def refused(self, cfg: Config) -> Iterator[str]:
        """The messages of the refusals that apply to `cfg`."""
        return (msg for r in self.refusals if (msg := r.check(cfg)) is not None)

    def model_identity(self, m: ModelConfig) -> dict[str, Any]:
        """{"model.<field>": value} of the fields that define this arch's model (`identity_fields`)."""
        return {f"model.{name}": getattr(m, name) for name in self.identity_fields}


def shell_params(m: ModelConfig) -> int:
    """Embedding, output head (unless tied) and final norm."""
    return m.vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2) + norm_params(m)


def _load(path: str) -> Any:
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _brt_layers(m: ModelConfig, seq_length: int) -> list[LayerKind]:
    recurrent = set(m.recurrent_layer_indices)
    window, rec = attention_layer(m, seq_length, m.block_size), recurrent_layer(m, seq_length)
    return [rec if i in recurrent else window for i in range(m.num_layers)]


def _next_multiple(value: int, base: int) -> int:
    return -(-value // base) * base


def _causal_segments(c: Config) -> str | None:
    if c.data.packing != "segments":
        return None
    return ("data.packing=segments with model.arch=transformer: the causal Transformer's key/value cache "
            "grows with every segment, so it cannot be carried across training steps; use "
            "data.packing=packed (or model.arch=sliding / brt, whose carried caches are bounded)")


def _chunk_aligned(c: Config) -> str | None:
    m, seq = c.model, c.data.seq_length
    if m.retention_mode != "chunk" or seq % m.chunk_size == 0:
        return None
    return (f"data.seq_length={seq} is not a multiple of model.chunk_size={m.chunk_size}; set "
            f"data.seq_length to a multiple (e.g. {_next_multiple(seq, m.chunk_size)}) "
            "or change model.chunk_size")


def _block_aligned(c: Config) -> str | None:
    m, seq = c.model, c.data.seq_length
    if seq % m.block_size == 0:
        return None
    return (f"data.seq_length={seq} (the segment) is not a multiple of model.block_size={m.block_size}; "
            f"set data.seq_length to a multiple (e.g. {_next_multiple(seq, m.block_size)}) "
            "or change model.block_size")


def _recurrent_layers(c: Config) -> str | None:
    m = c.model
    bad = [i for i in m.recurrent_layers if not -m.num_layers <= i < m.num_layers]
    if bad or not m.recurrent_layers:
        return (f"model.recurrent_layers={m.recurrent_layers} must be a non-empty list of layer indices in "
                f"[-{m.num_layers}, {m.num_layers - 1}] (model.num_layers={m.num_layers})")
    if len(set(m.recurrent_layer_indices)) != len(m.recurrent_layers):
        return (f"model.recurrent_layers={m.recurrent_layers} names the same layer twice "
                f"(model.num_layers={m.num_layers})")
    return None


def _context_split(c: Config) -> str | None:
    cp, seq = c.parallel.context_parallel, c.data.seq_length
    if seq % cp == 0:
        return None
    return (f"data.seq_length={seq} is not divisible by parallel.context_parallel={cp}: every CP rank holds "
            f"an equal slice; set data.seq_length to a multiple (e.g. {_next_multiple(seq, cp)})")


def _no_context_parallel(reason: str) -> Callable[[Config], str | None]:
    def check(c: Config) -> str | None:
        if c.parallel.context_parallel == 1:
            return None
        return (f"parallel.context_parallel={c.parallel.context_parallel} with model.arch={c.model.arch}: "
                f"{reason}; set parallel.context_parallel=1 (or model.arch=retnet, transformer or sliding)")
    return check


def _context_heads(c: Config) -> str | None:
    heads, tp, cp = c.model.num_heads, c.parallel.tensor, c.parallel.context_parallel
    if heads % (tp * cp) == 0:
        return None
    return (f"model.num_heads={heads} is not divisible by "
            f"parallel.tensor*parallel.context_parallel={tp}*{cp}: "
            "attention under CP trades sequence slices for whole heads (Ulysses all-to-all, "
            "megaret/parallel/attention_cp.py); use a context_parallel that divides the heads of a TP rank")


def _context_blocks(c: Config) -> str | None:
    cp, seq, block = c.parallel.context_parallel, c.data.seq_length, c.model.block_size
    if cp == 1 or seq % cp or (seq // cp) % block == 0:
        return None
    return (f"data.seq_length={seq} over parallel.context_parallel={cp} gives slices of {seq / cp:g} tokens, "
            f"not whole blocks of model.block_size={block}: under CP each rank attends to the previous "
            f"rank's last block (the halo); set data.seq_length to a multiple of {cp * block} "
            f"(e.g. {_next_multiple(seq, cp * block)})")


_BLOCK_ALIGNED = Refusal(_block_aligned, ("data.seq_length=100", "model.block_size=16"))
_CP_SPLIT = Refusal(_context_split,
                    ("data.seq_length=66", "model.chunk_size=2", "parallel.context_parallel=4"))
# the causal Transformer runs CP as Ulysses all-to-all: CP must divide each TP rank's heads
_CP_HEADS = Refusal(_context_heads, ("parallel.context_parallel=8",))
# the sliding arch passes the previous rank's last block (a halo): slices of whole blocks
_CP_BLOCKS = Refusal(_context_blocks,
                     ("data.seq_length=96", "model.block_size=16", "parallel.context_parallel=4"))
# BRT's recurrent layer runs sequentially across blocks, so CP would pass its state rank after rank
# (no overlap): refused with that reason
_CP_BRT = Refusal(_no_context_parallel(
    "BRT's recurrent layer is sequential across blocks, so CP ranks would wait for each other's state one "
    "after another (no parallel speed-up); use pipeline or tensor parallelism"),
    ("parallel.context_parallel=2",))

# the model fields every arch's weights depend on (shapes, tying, norms, rotary positions)
_SHAPE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "ffn_type", "norm_type",
          "tie_embeddings", "rotary_base")


def _retnet_fused(m: ModelConfig) -> tuple[FusedRows, ...]:
    from megaret.models.fused import qkvg_rows  # torch: imported when asked

    return (qkvg_rows(m.hidden_size, m.num_heads, m.value_factor, scope="retention."),)


def _transformer_hf_class(m: ModelConfig) -> str | None:
    """The LayerNorm/GELU baseline is GPT-NeoX, the RMSNorm/SwiGLU one Llama (rotary rows permuted)."""
    return {("layernorm", "gelu"): "GPTNeoXForCausalLM",
            ("rmsnorm", "swiglu"): "LlamaForCausalLM"}.get((m.norm_type, m.ffn_type))


SPECS: dict[str, ArchSpec] = {
    "retnet": ArchSpec(
        name="retnet",
        model_class="megaret.models.retnet:RetNet",
        layers=lambda m, t: [retention_layer(m, t)] * m.num_layers,
        carried_span=lambda m: 0,  # a fixed-size state summarises the whole history
        prefill_form="chunk",
        step_form="recurrent",
        fixed_step_state=True,
        refusals=(Refusal(_chunk_aligned, ("data.seq_length=100", "model.chunk_size=16")), _CP_SPLIT),
        identity_fields=(*_SHAPE, "value_factor", "decay_schedule"),
        fused_weights=_retnet_fused,
    ),
    "transformer": ArchSpec(
        name="transformer",
        model_class="megaret.models.transformer:Transformer",
        hf_native_class=_transformer_hf_class,
        layers=lambda m, t: [attention_layer(m, t, None)] * m.num_layers,
        refusals=(Refusal(_causal_segments, ("data.packing=segments",)), _CP_SPLIT, _CP_HEADS),
        attention=("causal",),
        identity_fields=_SHAPE,
    ),
    "sliding": ArchSpec(
        name="sliding",
        model_class="megaret.models.transformer:Transformer",
        layers=lambda m, t: [attention_layer(m, t, m.block_size)] * m.num_layers,
        build_kwargs=lambda m: {"window": m.block_size},
        carried_span=lambda m: m.block_size,
        refusals=(_BLOCK_ALIGNED, _CP_SPLIT, _CP_BLOCKS),
        attention=("block_window",),
        identity_fields=(*_SHAPE, "block_size"),
    ),
    "brt": ArchSpec(
        name="brt",
        model_class="megaret.models.brt:BlockRecurrentTransformer",
        layers=_brt_layers,
        carried_span=lambda m: m.block_size,  # plus the S recurrent states, which summarise the rest
        call_multiple=lambda m: m.block_size,
        refusals=(Refusal(_recurrent_layers, ("model.recurrent_layers=[0,-3]",)), _BLOCK_ALIGNED, _CP_BRT),
        attention=("block_window", "brt_state"),
        identity_fields=(*_SHAPE, "block_size", "num_states", "recurrent_layers", "gate_type", "state_skip"),
    ),
}
assert set(SPECS) == set(ARCHS), "every arch of the config schema has a spec"
ATTENTION_FORMS = ("causal", "block_window", "brt_state")
assert all(set(s.attention) <= set(ATTENTION_FORMS) for s in SPECS.values()), "known attention forms"


def arch_spec(arch: str) -> ArchSpec:
    try:
        return SPECS[arch]
    except KeyError:
        raise ValueError(f"model.arch: unknown {arch!r}; use one of {', '.join(SPECS)}") from None


def param_count(m: ModelConfig) -> int:
    """Closed-form parameter count of the model `build_model(m, ...)` builds."""
    return arch_spec(m.arch).param_count(m)


def build_model(cfg: ModelConfig, config: TransformerConfig, tp: TensorParallel, **stage: Any) -> nn.Module:
    """The model model.arch names (or one pipeline stage of it), built through its spec.

    Every model takes the one forward signature (`StagedLanguageModel.forward`) and returns an
    output with `.logits` (B, T, V / tp), `.loss` (B, T) or None and `.state` (the state protocol).
    """
    return arch_spec(cfg.arch).build(cfg, config, tp, **stage)
