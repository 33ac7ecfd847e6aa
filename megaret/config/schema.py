"""Typed configuration schema for megaret.

One dataclass per YAML section, gathered in :class:`Config`. Each section checks its own fields
(choices, positive sizes) in ``__post_init__``; :meth:`Config.validate` checks the rules that tie
sections together (divisibility by the parallel layout, chunking, batch sizes). Every failure is a
:class:`ConfigError` whose message is a single line naming the dotted key and how to fix it.

YAML loading, dotted overrides and type checking live in :mod:`megaret.config.loader`.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from megaret.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown, mistyped or inconsistent (one-line message)."""


# --------------------------------------------------------------------------------------------
# choices: written once here; `choices(T)` lists them for the code that dispatches on them

Arch = Literal["retnet", "transformer", "sliding", "brt"]
FfnType = Literal["gelu", "swiglu"]
RetentionMode = Literal["parallel", "chunk", "recurrent"]
RetentionKernel = Literal["auto", "torch", "fla"]
DecaySchedule = Literal["retnet", "loglinear"]
NormType = Literal["layernorm", "rmsnorm"]
GateType = Literal["fixed", "lstm"]
OnCorrupt = Literal["error", "skip"]
Packing = Literal["packed", "segments"]
DefaultCorpus = Literal["small", "full"]
DataSource = Literal["shards", "synthetic"]
DecayStyle = Literal["polynomial", "cosine", "linear", "constant"]
Precision = Literal["fp32", "bf16"]
Backend = Literal["auto", "nccl", "gloo"]
LoadMode = Literal["weights", "weights+optimizer", "all"]


def choices(literal: Any) -> tuple[str, ...]:
    """The values of a choice type, e.g. choices(Packing) == ("packed", "segments")."""
    return typing.get_args(literal)


ARCHS: tuple[str, ...] = choices(Arch)


def check_choice(key: str, value: str, literal: Any) -> None:
    """Library code's guard for a choice argument: ValueError naming `key` and the choices."""
    if value not in choices(literal):
        raise ValueError(f"{key}: unknown {value!r}; use one of {', '.join(choices(literal))}")


# --------------------------------------------------------------------------------------------
# helpers


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] if n > 0 else []


def _next_multiple(value: int, base: int) -> int:
    return ((value + base - 1) // base) * base


def _require_divisible(key: str, value: int, by_key: str, by: int, fix: str) -> None:
    if value % by:
        raise ConfigError(f"{key}={value} is not divisible by {by_key}={by}; {fix}")


def _fmt(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


@functools.cache
def _choice_fields(cls: type) -> dict[str, tuple[str, ...]]:
    """{field name: allowed values} of a section's Literal-typed fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: choices(hints[f.name]) for f in dataclasses.fields(cls)
            if typing.get_origin(hints[f.name]) is Literal}


class _Section:
    """Mixin with the per-field checks shared by all sections."""

    _section: ClassVar[str] = ""

    def _key(self, name: str) -> str:
        return f"{self._section}.{name}"

    def _check_choices(self) -> None:
        for name, allowed in _choice_fields(type(self)).items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{self._key(name)}: {value!r} is not one of {', '.join(allowed)}")

    def _positive(self, *names: str) -> None:
        """Each named field must be > 0 (None is allowed for optional fields)."""
        for name in names:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{self._key(name)}={value} must be > 0")

    def _non_negative(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigError(f"{self._key(name)}={value} must be >= 0")


# --------------------------------------------------------------------------------------------
# sections


@dataclass
class ModelConfig(_Section):
    """Network shape and numerics."""

    _section: ClassVar[str] = "model"

    arch: Arch = "retnet"  # retnet | transformer (causal) | sliding (block-windowed) | brt
    # rows of the embedding and output layer; null: the data's tokenizer's id count padded up to a
    # multiple of vocab_multiple, fixed at the first step (megaret/data/vocab.py)
    vocab_size: int | None = None
    vocab_multiple: int = 128  # what a null vocab_size is padded to (must be a multiple of parallel.tensor)
    # ids the tokenizer produces (null: from the data): the logits of ids from here up to vocab_size
    # (padding) are -inf, never predicted
    tokenizer_vocab_size: int | None = None
    hidden_size: int = 2048  # model width d
    num_layers: int = 24  # layers in the stack
    num_heads: int = 8  # attention / retention heads (H)
    ffn_hidden_size: int = 4096  # FFN inner width
    ffn_type: FfnType = "gelu"  # gelu (2 matrices) | swiglu (3 matrices)
    value_factor: int = 2  # value / gate width = value_factor * hidden_size
    chunk_size: int = 256  # chunk length of the chunkwise retention form
    retention_mode: RetentionMode = "chunk"  # retention form for training: parallel | chunk | recurrent
    # what runs the chunk form: torch (megaret/ops/retention.py), fla (flash-linear-attention's
    # Triton kernel, megaret/ops/retention_fla.py; pip install 'megaret[gpu]'), or auto: fla on CUDA
    # when it is installed, else torch
    retention_kernel: RetentionKernel = "auto"
    decay_schedule: DecaySchedule = "retnet"  # retention decays: retnet (1 - 2^(-5-h)) | loglinear
    rotary_base: float = 10000.0  # rotary angle base
    norm_eps: float = 1e-6  # epsilon of every norm
    dropout: float = 0.0  # residual-branch dropout probability
    init_std: float = 0.02  # std of the normal weight initialisation
    tie_embeddings: bool = False  # share the embedding and output matrices
    norm_type: NormType = "layernorm"  # layernorm | rmsnorm
    # sliding / brt: block length W; attention sees the previous block and the causal current one
    block_size: int = 512
    # brt only: the recurrent cell (data.seq_length is the segment, a multiple of block_size)
    num_states: int = 512  # state vectors S carried from block to block
    recurrent_layers: list[int] = field(default_factory=lambda: [-3])  # layer indices; negative from the end
    gate_type: GateType = "fixed"  # fixed | lstm gate on the state path
    state_skip: bool = True  # True: no MLP on the state path (Rec:fixed:skip)

    def __post_init__(self) -> None:
        self._check_choices()
        self._positive(
            "vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "value_factor",
            "chunk_size", "rotary_base", "norm_eps", "init_std", "block_size", "num_states", "vocab_multiple",
            "tokenizer_vocab_size",
        )  # fmt: skip
        v, t = self.vocab_size, self.tokenizer_vocab_size
        if v is not None and t is not None and t > v:
            raise ConfigError(f"model.tokenizer_vocab_size={t} is above model.vocab_size={v}; raise "
                              "model.vocab_size or set it to null")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        """Query/key width of one head."""
        return self.hidden_size // self.num_heads

    @property
    def recurrent_layer_indices(self) -> list[int]:
        """model.recurrent_layers as sorted non-negative indices."""
        return sorted(i % self.num_layers for i in self.recurrent_layers)


def zero_pipeline_refusal(zero_stage: int, pipeline: int, clip_grad: float = 0.0) -> str | None:
    """Why DeepSpeed's ZeRO `zero_stage` cannot train under `pipeline` stages (None: it can)."""
    if zero_stage >= 2 and pipeline > 1:
        return (f"parallel.zero_stage={zero_stage} cannot run under a pipeline schedule "
                f"(parallel.pipeline={pipeline}): DeepSpeed ZeRO-2/3 reduce gradients inside each "
                "micro-batch; use parallel.zero_stage=1 or parallel.pipeline=1")
    if zero_stage == 0 and pipeline > 1 and clip_grad > 0:
        return (f"parallel.zero_stage=0 with parallel.pipeline={pipeline}: DeepSpeed's ZeRO-0 gradient "
                "norm is wrong under a pipeline (so is clipping with optimizer.clip_grad); use "
                "parallel.zero_stage=1")
    return None


@dataclass
class ParallelConfig(_Section):
    """Megatron parallel layout and DeepSpeed ZeRO stage."""

    _section: ClassVar[str] = "parallel"

    tensor: int = 1  # tensor-parallel size
    pipeline: int = 1  # pipeline stages
    virtual_pipeline: int | None = None  # model chunks per stage (interleaved schedule)
    # context parallelism (megatron's context_parallel_size): each CP rank holds a contiguous slice of
    # every sample; gradients are summed over DP x CP and ZeRO shards over DP x CP (as megatron's)
    context_parallel: int = 1
    zero_stage: int = 1  # DeepSpeed ZeRO stage, 0..3
    sequence_parallel: bool = False  # Megatron sequence parallelism (needs tensor > 1)
    # torch.distributed backend: nccl = one GPU per rank; gloo = CPU ranks (tensors on the CPU);
    # auto = nccl when CUDA is available, else gloo
    backend: Backend = "auto"

    def __post_init__(self) -> None:
        self._check_choices()
        self._positive("tensor", "pipeline", "virtual_pipeline", "context_parallel")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage={self.zero_stage} is not one of 0, 1, 2, 3")
        if self.sequence_parallel and self.tensor <= 1:
            raise ConfigError(
                "parallel.sequence_parallel=true requires parallel.tensor > 1; "
                "set parallel.tensor to 2 or more or parallel.sequence_parallel=false"
            )
        if self.virtual_pipeline is not None and self.virtual_pipeline > 1 and self.pipeline <= 1:
            raise ConfigError(
                f"parallel.virtual_pipeline={self.virtual_pipeline} needs parallel.pipeline > 1; "
                "set parallel.pipeline to 2 or more or parallel.virtual_pipeline=null"
            )
        if message := zero_pipeline_refusal(self.zero_stage, self.pipeline):
            raise ConfigError(message)

    @property
    def model_parallel_size(self) -> int:
        """Processes that share one sample (tensor * pipeline * context_parallel)."""
        return self.tensor * self.pipeline * self.context_parallel


@dataclass
class DataConfig(_Section):
    """Training corpus and tokenization."""

    _section: ClassVar[str] = "data"

    seq_length: int = 2048  # tokens per sample
    paths: list[str] = field(default_factory=list)  # empty: the embedded default corpus
    weights: list[float] | None = None  # sampling weight per path (same length as paths)
    tokenizer: str | None = None  # None: the default tokenizer
    num_workers: int = 2  # DataLoader workers per rank (0 = load in the main process)
    on_corrupt: OnCorrupt = "error"  # what to do with an unreadable shard / sample
    # reset at document boundaries inside packed samples (batch.doc_start), in every arch: retnet and
    # brt restart their recurrent state there, and no attention (transformer, sliding, brt) crosses one
    reset_at_doc_boundaries: bool = False
    packing: Packing = "packed"  # packed: docs joined by <eos>; segments: document-ordered slots (stateful)
    default_corpus: DefaultCorpus = "small"  # size of the embedded corpus built when data.paths is empty
    # vocabulary its tokenizer is trained to (null: model.vocab_size, or 32000 when that is null too)
    default_corpus_vocab: int | None = None
    # default-corpus shards and fetched remote shards (None: ~/.cache/megaret/data)
    cache_dir: str | None = None
    source: DataSource = "shards"  # shards: the WebDataset shards above; synthetic: a toy bigram task (tests)

    def __post_init__(self) -> None:
        self._check_choices()
        self._positive("seq_length", "default_corpus_vocab")
        self._non_negative("num_workers")
        if self.weights is not None:
            if len(self.weights) != len(self.paths):
                raise ConfigError(
                    f"data.weights has {len(self.weights)} entries but data.paths has {len(self.paths)}; "
                    "give one weight per path or set data.weights=null"
                )
            if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
                raise ConfigError(f"data.weights={self.weights} must be non-negative with a positive sum")


@dataclass
class OptimizerConfig(_Section):
    """AdamW and the learning-rate schedule."""

    _section: ClassVar[str] = "optimizer"

    lr: float = 6e-4  # peak learning rate
    min_lr: float = 0.0  # floor of the decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.01  # AdamW decoupled weight decay (matrices only)
    warmup_steps: int = 375  # linear warm-up steps from 0 to optimizer.lr
    decay_style: DecayStyle = "polynomial"  # decay after warm-up: polynomial | cosine | constant | linear
    decay_power: float = 1.0  # exponent of the polynomial decay (1: linear, as RetNet's recipe)
    clip_grad: float = 2.0  # global gradient-norm clip (0 disables)

    def __post_init__(self) -> None:
        self._check_choices()
        self._positive("lr", "eps", "decay_power")
        self._non_negative("min_lr", "weight_decay", "warmup_steps", "clip_grad")
        if self.min_lr > self.lr:
            raise ConfigError(
                f"optimizer.min_lr={self.min_lr} is above optimizer.lr={self.lr}; lower optimizer.min_lr"
            )
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optimizer.betas={self.betas} must be two numbers in [0, 1), e.g. [0.9, 0.98]")


@dataclass
class TrainConfig(_Section):
    """Length of the run, batch sizes, precision."""

    _section: ClassVar[str] = "train"

    steps: int = 25000  # optimizer steps
    seed: int = 1234  # seeds weights, data order and dropout
    micro_batch_size: int = 1  # sequences per rank per forward/backward
    global_batch_size: int = 8  # sequences per optimizer step, over all data-parallel ranks
    precision: Precision = "bf16"  # bf16 (fp32 masters and gradient accumulation) | fp32
    log_interval: int = 10  # steps between console lines (their means) and TensorBoard flushes
    eval_interval: int = 1000  # 0 (or eval_steps=0): no evaluation, the valid split is not read
    eval_steps: int = 10  # 0 skips evaluation
    recompute: bool = False  # activation recomputation
    max_consecutive_skips: int = 5  # stop after this many steps in a row with a NaN/inf loss or grad
    # seconds a collective may wait for a peer (a stalled or dead rank) before the job fails (non-zero
    # exit, so SLURM can requeue it); passed to init_process_group and every megatron group
    collective_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        self._check_choices()
        self._positive("steps", "micro_batch_size", "global_batch_size", "log_interval",
                       "max_consecutive_skips", "collective_timeout_s")
        self._non_negative("seed", "eval_steps", "eval_interval")


@dataclass
class CheckpointConfig(_Section):
    """When to save and which checkpoints to keep."""

    _section: ClassVar[str] = "checkpoint"

    interval: int = 1000  # steps between saves
    keep_last: int = 3  # most recent checkpoints kept
    keep_every: int | None = None  # also keep every checkpoint whose step is a multiple of this
    resume: bool = True  # resume from the newest checkpoint in run.dir when there is one
    # start a new run.dir from another run's checkpoint (a step, checkpoints/ or run directory; used only
    # while run.dir has no checkpoint of its own): load_mode says what it takes from it (README: Checkpoints)
    load: str | None = None
    load_mode: LoadMode = "weights"  # weights | weights+optimizer | all

    def __post_init__(self) -> None:
        self._check_choices()
        self._positive("interval", "keep_last", "keep_every")
        if self.load is not None and not self.load.strip():
            raise ConfigError("checkpoint.load is empty; give a checkpoint, checkpoints/ or run directory, "
                              "or checkpoint.load=null")


@dataclass
class LoggingConfig(_Section):
    """Metric sinks and profiling."""

    _section: ClassVar[str] = "logging"

    tensorboard: bool = True  # write run.dir/tensorboard
    profile: bool = False  # torch.profiler trace of a few steps under run.dir/tensorboard/profile
    # peak dense TFLOP/s of one device for MFU (None: known GPU models by name; else MFU is not logged)
    peak_tflops: float | None = None

    def __post_init__(self) -> None:
        self._positive("peak_tflops")


@dataclass
class LaunchConfig(_Section):
    """SLURM allocation (used by the launcher, ignored by the trainer)."""

    _section: ClassVar[str] = "launch"

    nodes: int = 1  # SLURM nodes
    gpus_per_node: int = 8  # GPUs per node
    tasks_per_node: int | None = None  # None: one task per GPU (= gpus_per_node)
    cpus_per_task: int = 8  # CPU cores per task
    mem_gb: int | None = None  # None: the partition's default
    time_min: int = 240  # wall-clock limit in minutes
    partition: str | None = None  # SLURM partition (null: the cluster's default)
    account: str | None = None  # SLURM account
    qos: str | None = None  # SLURM QoS
    constraint: str | None = None  # SLURM node constraint
    extra_sbatch: dict[str, str] = field(default_factory=dict)  # option -> value ("" for a bare flag)
    gpu_mem_gb: float = 80.0  # memory of one GPU: the launcher refuses a plan that would not fit

    def __post_init__(self) -> None:
        self._positive("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "time_min",
                       "gpu_mem_gb")

    @property
    def world_size(self) -> int:
        """Processes the allocation starts (nodes * tasks per node)."""
        return self.nodes * self.resolved_tasks_per_node

    @property
    def resolved_tasks_per_node(self) -> int:
        return self.tasks_per_node if self.tasks_per_node is not None else self.gpus_per_node


@dataclass
class RunConfig(_Section):
    """Where the run writes checkpoints, logs and its resolved config."""

    _section: ClassVar[str] = "run"

    dir: str = "runs/default"  # the run's directory: config, checkpoints, logs, TensorBoard
    name: str | None = None  # None: the last component of run.dir
    # with checkpoint.resume=false: start a run.dir that has checkpoints over, after moving its earlier
    # checkpoints, config and TensorBoard events to run.dir/replaced-<time>/ (nothing is deleted)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.dir.strip():
            raise ConfigError("run.dir is empty; set run.dir to a directory, e.g. runs/my-run")


# --------------------------------------------------------------------------------------------
# the whole config


@dataclass
class Config:
    """The complete, validated configuration of one run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        self.validate()

    # -- cross-field rules -------------------------------------------------------------------

    def validate(self) -> None:
        """Re-run every check (sections and cross-field); call again after mutating fields."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            post_init = getattr(section, "__post_init__", None)
            if post_init is not None:
                post_init()
        self._validate_model_shape()
        self._validate_arch()
        self._validate_parallel_layout()
        self._validate_training_features()
        self._validate_batch()
        if self.run.overwrite and self.checkpoint.resume:
            raise ConfigError("run.overwrite=true starts run.dir over, which checkpoint.resume=true would "
                              "resume: set checkpoint.resume=false with it (or drop run.overwrite)")

    def _validate_model_shape(self) -> None:
        m = self.model
        _require_divisible("model.hidden_size", m.hidden_size, "model.num_heads", m.num_heads,
                           f"choose model.num_heads from {_fmt(_divisors(m.hidden_size))}")
        if m.head_dim % 2:
            raise ConfigError(
                f"model.hidden_size/model.num_heads={m.head_dim} must be even (rotary embeddings rotate "
                "pairs of channels); change model.num_heads or model.hidden_size"
            )

    def _validate_arch(self) -> None:
        """What model.arch itself refuses: its spec's refusals (megaret/models/spec.py)."""
        from megaret.models.spec import arch_spec  # no megatron import: the spec module is light

        for message in arch_spec(self.model.arch).refused(self):
            raise ConfigError(message)

    def _validate_parallel_layout(self) -> None:
        m, p = self.model, self.parallel
        tp = p.tensor
        if m.num_heads % tp:
            raise ConfigError(
                f"model.num_heads={m.num_heads} is not divisible by parallel.tensor={tp}; "
                f"choose parallel.tensor from {_fmt(_divisors(m.num_heads))}"
            )
        for name in ("vocab_size", "ffn_hidden_size"):
            value = getattr(m, name)
            if value is not None and value % tp:  # a null vocab_size is checked when it is filled
                raise ConfigError(
                    f"model.{name}={value} is not divisible by parallel.tensor={tp}; "
                    f"set model.{name} to a multiple of {tp} (e.g. {_next_multiple(value, tp)}) "
                    "or change parallel.tensor"
                )
        if p.sequence_parallel and self.data.seq_length % tp:
            raise ConfigError(
                f"data.seq_length={self.data.seq_length} is not divisible by parallel.tensor={tp} as "
                "sequence parallelism needs; change data.seq_length or set parallel.sequence_parallel=false"
            )
        vp = p.virtual_pipeline or 1
        stages = p.pipeline * vp
        if m.num_layers % stages:
            if vp > 1:
                what = f"parallel.pipeline*parallel.virtual_pipeline={p.pipeline}*{vp}={stages}"
                fix = "choose parallel.pipeline*parallel.virtual_pipeline from"
            else:
                what = f"parallel.pipeline={p.pipeline}"
                fix = "choose parallel.pipeline from"
            raise ConfigError(
                f"model.num_layers={m.num_layers} is not divisible by {what}; "
                f"{fix} {_fmt(_divisors(m.num_layers))}"
            )

    def _validate_training_features(self) -> None:
        """Combinations the trainer cannot run, whatever the arch."""
        p = self.parallel
        if p.sequence_parallel and p.zero_stage >= 2:
            raise ConfigError(
                f"parallel.sequence_parallel=true with parallel.zero_stage={p.zero_stage}: ZeRO-2/3 reduce "
                "gradients inside the backward, before the norms' sequence-parallel gradients are summed "
                "over tensor-parallel ranks; use parallel.zero_stage=1 (or 0)")
        if self.model.tie_embeddings and p.pipeline > 1:
            raise ConfigError(
                "model.tie_embeddings=true needs the embedding and output layer on one stage; set "
                "model.tie_embeddings=false or parallel.pipeline=1")

    def _validate_batch(self) -> None:
        t = self.train
        _require_divisible("train.global_batch_size", t.global_batch_size, "train.micro_batch_size",
                           t.micro_batch_size, "set train.global_batch_size to a multiple (e.g. "
                           f"{_next_multiple(t.global_batch_size, t.micro_batch_size)}) or change "
                           "train.micro_batch_size")

    def validate_world(self, world_size: int) -> int:
        """The checks the trainer runs before it starts, for ``world_size`` processes (the launcher's
        dry run runs them for the `launch` allocation); returns the data-parallel size."""
        p, t = self.parallel, self.train
        mp = p.model_parallel_size
        if world_size <= 0:
            raise ConfigError(f"world size {world_size} must be > 0")
        if world_size % mp:
            cp = p.context_parallel > 1  # named only where it is used
            cp_name, cp_value, cp_fix = ("*parallel.context_parallel", f"*{p.context_parallel}",
                                         " / parallel.context_parallel") if cp else ("", "", "")
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tensor*parallel.pipeline{cp_name}="
                f"{p.tensor}*{p.pipeline}{cp_value}={mp}; launch a multiple of {mp} processes or change "
                f"parallel.tensor / parallel.pipeline{cp_fix}"
            )
        dp = world_size // mp
        if message := zero_pipeline_refusal(p.zero_stage, p.pipeline, self.optimizer.clip_grad):
            raise ConfigError(message)
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"train.micro_batch_size*data-parallel size={t.micro_batch_size}*{dp}={per_step} "
                f"(world {world_size} = tensor {p.tensor} x pipeline {p.pipeline} x context "
                f"{p.context_parallel} x data {dp}); "
                f"set train.global_batch_size to a multiple of {per_step} "
                f"(e.g. {_next_multiple(t.global_batch_size, per_step)})"
            )
        return dp

    # -- conversion --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (section -> key -> value), safe for ``yaml.safe_dump``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build and validate a Config from a nested mapping (types are checked)."""
        from megaret.config.loader import config_from_dict

        return config_from_dict(data)


#: section name -> section class, in YAML order
SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "launch": LaunchConfig,
    "run": RunConfig,
}
