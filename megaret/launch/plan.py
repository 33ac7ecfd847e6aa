"""Launch planning: layout, parameters per rank and memory per GPU, as pure functions of a Config.

`make_plan(cfg)` answers, before any job is submitted: how the `launch` allocation splits into
TP x CP x PP x DP, how many micro-batches make one step, how many parameters each pipeline stage's
ranks hold, and roughly how much GPU memory each rank needs. A layout that cannot divide or
cannot fit in `launch.gpu_mem_gb` raises `PlanError` with the reason.

Memory model (bytes per GPU; Psi = parameters on this rank, after TP and PP splitting):

- weights, gradients, optimizer state follow the ZeRO paper's accounting (Rajbhandari et al.
  2020, sec. 3.1): bf16 mixed precision keeps 2 Psi weights, 2 Psi gradients and 12 Psi of
  optimizer state (fp32 master weights + Adam m and v); fp32 keeps 4 Psi + 4 Psi + 8 Psi.
  ZeRO stage >= 1 shards the optimizer state over DP x CP (as the trainer and megatron do), >= 2
  also the gradients, 3 also the weights. (DeepSpeed's bf16 ZeRO-1 also keeps an fp32 gradient
  buffer; not counted.)
- activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models", sec. 4): one layer and micro-batch of b sequences of s tokens stores
  s b h (10 + 24/t) + 5 a s w b / t bytes in 16-bit (s b h 34 / t + ... with sequence
  parallelism), where w is how many keys each query's scores span in memory: s for full
  attention or parallel retention, the chunk size for chunkwise retention, twice the block
  for sliding-window / block-recurrent layers. Full recomputation (`train.recompute`) keeps
  only each layer's input (2 s b h, / t with sequence parallelism) plus one layer's working
  set. Under 1F1B the ranks of pipeline stage i hold min(pp - i, micro-batches) micro-batches
  in flight. The last stage adds fp32 logits and their gradient (2 x 4 s b V / t). fp32
  training doubles the 16-bit figures. Under context parallelism (parallel.context_parallel = c)
  a rank holds s / c tokens of each sequence, so every term above takes s / c for s (the causal
  Transformer's Ulysses score matrices are H / c heads x s queries x the span, the sliding arch's
  s / c queries x its span over all H heads: the same count). The CP exchanges' buffers (RetNet:
  c states of H Dk Dv per layer; Ulysses: one slice's q, k, v, o; the sliding arch's halo: c
  blocks of keys and values) are transient and not counted. The RetNet's wider value path (value_factor) and
  framework buffers are not modelled: treat it as an estimate, good to tens of percent.
- a layout fits when the estimate is at most USABLE_FRACTION of `launch.gpu_mem_gb`
  (the rest is left for the CUDA context, NCCL buffers and allocator fragmentation).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from megaret.config import Config, ConfigError, ModelConfig
from megaret.errors import UserError
from megaret.models.layout import rank_layers
from megaret.models.spec import arch_spec, norm_params

GIB = 1024**3
USABLE_FRACTION = 0.9


class PlanError(UserError, ValueError):
    """The launch cannot work as configured (one line: what and how to fix it)."""


@dataclass(frozen=True)
class Layout:
    nodes: int
    tasks_per_node: int
    world: int
    tp: int
    cp: int  # context parallel: each rank holds seq_length / cp tokens of every sequence
    pp: int
    vp: int  # virtual stages per pipeline rank (1 without interleaving)
    dp: int
    micro_batch_size: int  # sequences per rank per forward/backward
    micro_batches: int  # forward/backward passes per optimizer step on each rank
    global_batch: int  # sequences per optimizer step
    seq_length: int

    @property
    def local_seq_length(self) -> int:
        """Tokens of each sequence one rank holds (its context-parallel slice)."""
        return self.seq_length // self.cp

    @property
    def global_batch_tokens(self) -> int:
        return self.global_batch * self.seq_length


@dataclass(frozen=True)
class Memory:
    """Estimated bytes on one GPU."""

    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass(frozen=True)
class Plan:
    layout: Layout
    total_params: int
    stage_params: list[int]  # parameters held by one rank of each pipeline stage
    stage_memory: list[Memory]  # estimated memory of one rank of each pipeline stage
    gpu_mem_gb: float
    zero_stage: int
    precision: str

    @property
    def worst_stage(self) -> int:
        return max(range(len(self.stage_memory)), key=lambda i: self.stage_memory[i].total)


# ---------------------------------------------------------------------------------------------
# layout


def make_layout(cfg: Config) -> Layout:
    """TP x CP x PP x DP of the `launch` allocation; PlanError when the world does not divide."""
    la, p, t = cfg.launch, cfg.parallel, cfg.train
    world = la.world_size
    try:
        dp = cfg.validate_world(world)
    except ConfigError as exc:
        raise PlanError(
            f"launch.nodes*tasks per node={la.nodes}*{la.resolved_tasks_per_node}: {exc}"
        ) from exc
    micro = t.global_batch_size // (t.micro_batch_size * dp)
    return Layout(
        la.nodes,
        la.resolved_tasks_per_node,
        world,
        p.tensor,
        p.context_parallel,
        p.pipeline,
        p.virtual_pipeline or 1,
        dp,
        t.micro_batch_size,
        micro,
        t.global_batch_size,
        cfg.data.seq_length,
    )


# ---------------------------------------------------------------------------------------------
# parameters


def stage_params(m: ModelConfig, tp: int, pp: int, vp: int = 1) -> list[int]:
    """Parameters one rank of each pipeline stage holds (its TP shard of its layers).

    Linear weights and per-head parameters are split over TP; norms (and a BRT layer's state
    vectors) are replicated on every TP rank.
    """
    kinds = arch_spec(m.arch).layers(m, 1)
    vocab = m.vocab_size * m.hidden_size // tp
    out = []
    for stage in range(pp):
        layers = rank_layers(m.num_layers, pp, stage, vp)
        n = sum(kinds[i].sharded // tp + kinds[i].replicated for i in layers)
        if stage == 0:
            n += vocab  # input embedding
        if stage == pp - 1:
            # output head; a tied head on a later stage is a second copy of the embedding
            n += norm_params(m) + (vocab if (not m.tie_embeddings or pp > 1) else 0)
        out.append(n)
    return out


# ---------------------------------------------------------------------------------------------
# memory


def state_memory(params: int, zero_stage: int, dp: int, precision: str) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes for `params` parameters under ZeRO `zero_stage` over `dp` ranks."""
    w, g, o = (2, 2, 12) if precision == "bf16" else (4, 4, 8)
    return (
        params * w / (dp if zero_stage >= 3 else 1),
        params * g / (dp if zero_stage >= 2 else 1),
        params * o / (dp if zero_stage >= 1 else 1),
    )


def activation_memory(cfg: Config, layout: Layout, stage: int) -> float:
    """Estimated activation bytes on one rank of pipeline stage `stage` (module docstring)."""
    m = cfg.model
    s, b, h, a, t = layout.local_seq_length, layout.micro_batch_size, m.hidden_size, m.num_heads, layout.tp
    sp = cfg.parallel.sequence_parallel
    kinds = arch_spec(m.arch).layers(m, layout.seq_length)  # the spans of the whole sequence
    layers = [kinds[i] for i in rank_layers(m.num_layers, layout.pp, stage, layout.vp)]
    per_layer = [s * b * h * (34 / t if sp else 10 + 24 / t) + 5 * a * s * k.span * b / t for k in layers]
    if cfg.train.recompute:
        stored = len(layers) * 2 * s * b * h / (t if sp else 1)
        working = max(per_layer, default=0.0)
    else:
        stored, working = sum(per_layer), 0.0
    in_flight = min(layout.pp - stage, layout.micro_batches)
    total = stored * in_flight + working
    if stage == layout.pp - 1:
        total += 2 * 4 * s * b * m.vocab_size / t  # fp32 logits and their gradient
    return total * (2 if cfg.train.precision == "fp32" else 1)


# ---------------------------------------------------------------------------------------------
# the plan


def make_plan(cfg: Config, check_fit: bool = True) -> Plan:
    """Layout, parameters and memory of the configured launch; PlanError if it cannot divide or fit.

    A null model.vocab_size is filled as the trainer will (megaret/data/vocab.py) from the manifests of
    data.paths; for the default corpus, not built here, from the size its tokenizer is trained to."""
    if cfg.model.vocab_size is None:
        from megaret.data.vocab import resolve_vocab

        cfg = copy.deepcopy(cfg)
        resolve_vocab(cfg, read_data=bool(cfg.data.paths) or cfg.data.source == "synthetic")
    layout = make_layout(cfg)
    z, prec = cfg.parallel.zero_stage, cfg.train.precision
    per_stage = stage_params(cfg.model, layout.tp, layout.pp, layout.vp)
    memory = [
        Memory(*state_memory(n, z, layout.dp * layout.cp, prec), activation_memory(cfg, layout, i))
        for i, n in enumerate(per_stage)
    ]
    total = arch_spec(cfg.model.arch).param_count(cfg.model)
    plan = Plan(layout, total, per_stage, memory, cfg.launch.gpu_mem_gb, z, prec)
    if check_fit:
        worst = plan.worst_stage
        need, usable = memory[worst].total / GIB, USABLE_FRACTION * plan.gpu_mem_gb
        if need > usable:
            raise PlanError(
                f"does not fit: pipeline stage {worst} needs ~{need:.1f} GiB per GPU (weights "
                f"{memory[worst].weights / GIB:.1f}, grads {memory[worst].grads / GIB:.1f}, optimizer "
                f"{memory[worst].optimizer / GIB:.1f}, activations {memory[worst].activations / GIB:.1f}) "
                f"but "
                f"launch.gpu_mem_gb={plan.gpu_mem_gb:g} leaves {usable:.1f} GiB usable at TP={layout.tp} "
                f"{f'CP={layout.cp} ' if layout.cp > 1 else ''}PP={layout.pp} DP={layout.dp} ZeRO-{z}; "
                "raise parallel.tensor / parallel.pipeline / parallel.context_parallel / "
                "parallel.zero_stage, set train.recompute=true or lower train.micro_batch_size"
            )
    return plan


def format_plan(plan: Plan) -> str:
    """The human-readable plan the launcher prints."""
    lo = plan.layout
    lines = [
        f"world size        {lo.world} = {lo.nodes} node(s) x {lo.tasks_per_node} task(s)",
        f"layout            TP={lo.tp} x " + (f"CP={lo.cp} x " if lo.cp > 1 else "")
        + f"PP={lo.pp} x DP={lo.dp}" + (f" (virtual pipeline {lo.vp})" if lo.vp > 1 else ""),
        f"batch             {lo.global_batch} sequences x {lo.seq_length} tokens = "
        f"{lo.global_batch_tokens:,} tokens per step; {lo.micro_batches} micro-batch(es) of "
        f"{lo.micro_batch_size} per rank per step",
        f"parameters        {plan.total_params:,} total",
    ]
    if lo.cp > 1:
        lines.insert(3, f"context           {lo.seq_length:,} tokens per sequence split over CP={lo.cp}: "
                        f"{lo.local_seq_length:,} per rank (activations below are for that slice)")
    for i, n in enumerate(plan.stage_params):
        lines.append(f"  per rank        stage {i}: {n:,}")
    lines.append(
        f"memory per GPU    (estimate, GiB; ZeRO-{plan.zero_stage}, {plan.precision}; "
        f"launch.gpu_mem_gb={plan.gpu_mem_gb:g}; activations at T={lo.seq_length:,})"
    )
    lines.append("  stage   weights   grads  optimizer  activations   total")
    for i, mem in enumerate(plan.stage_memory):
        lines.append(
            f"  {i:5d} {mem.weights / GIB:9.2f} {mem.grads / GIB:7.2f} {mem.optimizer / GIB:10.2f} "
            f"{mem.activations / GIB:12.2f} {mem.total / GIB:7.2f}"
        )
    worst, usable = plan.stage_memory[plan.worst_stage].total / GIB, USABLE_FRACTION * plan.gpu_mem_gb
    verdict = "yes" if worst <= usable else "NO"
    lines.append(
        f"fits              {verdict}: worst stage {plan.worst_stage} needs {worst:.2f} GiB of "
        f"{usable:.1f} usable ({USABLE_FRACTION:.0%} of launch.gpu_mem_gb)"
    )
    return "\n".join(lines)
