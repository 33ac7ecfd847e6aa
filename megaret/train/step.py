"""One optimizer step: micro-batches forward/backward, gradient reduction, the ZeRO step.

ZeRO-0/1: megatron-core's schedule (no pipelining, 1F1B or interleaved) runs the micro-
batches and accumulates gradients in the parameters; DeepSpeed then reduces them over DP and
steps. ZeRO-2/3 (PP=1 only): DeepSpeed's own forward/backward per micro-batch, since it
reduces gradients inside each backward.

Loss: the mean over the global batch of the per-token loss at the tokens the batch's
`loss_mask` marks (padding excluded). Each micro-batch's loss is its masked sum times
n_micro * dp / N, N the masked-token count of the whole global batch (one scalar all-reduce
over DP); megatron's schedule divides by n_micro and DeepSpeed averages over DP, so the
gradient is exactly that of sum(loss * mask) / N, whatever the micro-batch split. With an
all-ones mask this is the plain mean.

Carried state (stateful `data.packing=segments` training): a `StateCarry` holds, for each
virtual stage, the recurrent state of that stage's layers after its last micro-batch, detached,
and feeds it to the stage's next one (consecutive micro-batches and steps are consecutive
segments of the same slots). Under a pipeline each stage keeps the state of the layers it
owns: a stage runs its micro-batches in order whatever the schedule, and no gradient crosses
the carry, so the 1F1B and interleaved orders need nothing more. Slots whose `reset` flag is
set start afresh through the state protocol (`state.reset`: a zero retention state, an emptied
cache, BRT's learned initial state). The causal Transformer's cache grows without bound: its
spec refuses stateful training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import nn

from megaret.models.state import StackState
from megaret.parallel.context import ParallelContext
from megaret.train.batches import Batch


@dataclass
class StepResult:
    loss: float  # mean per-token loss over the global batch (NaN/inf when the step was bad)
    grad_norm: float | None  # global gradient norm before clipping
    lr: float
    skipped: bool  # no parameter update (non-finite loss or gradients)
    tokens: int = 0  # tokens that counted in the loss (loss_mask), whole global batch


class StateCarry:
    """Per virtual pipeline stage of this rank, the recurrent state its last micro-batch left for
    the next one (no gradient flows through it). Uses only the state protocol."""

    def __init__(self, state_type: type[StackState]) -> None:
        self.state_type = state_type  # what load_state_dict rebuilds (the arch spec's state class)
        self.state: dict[int, StackState] = {}  # stage index -> its layers' state

    def take(self, stage: int, reset: torch.Tensor | None, batch_size: int) -> StackState | None:
        """The state stage `stage` starts this micro-batch from; slots with `reset` (B,) start fresh."""
        state = self.state.get(stage)
        if state is None:
            return None
        if state.batch_size != batch_size:
            raise ValueError(f"carried state has batch {state.batch_size}, micro-batch has {batch_size}")
        if reset is None or not bool(reset.any()):
            return state
        if bool(reset.all()):
            return None  # every slot restarts: a fresh sequence, positions from 0
        return state.reset(reset)

    def put(self, stage: int, state: StackState | None) -> None:
        self.state[stage] = None if state is None else state.detach()

    def clear(self) -> None:
        self.state = {}

    # -- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[int, dict | None]:
        """Tensors and plain containers (loadable with torch.load(weights_only=True))."""
        return {stage: None if s is None else s.state_dict() for stage, s in self.state.items()}

    def load_state_dict(self, saved: dict | None, device: torch.device | str | None = None) -> None:
        """The form `state_dict` writes (format-1 checkpoints are unpacked to it by
        megaret.checkpoint.legacy)."""
        self.state = {int(stage): None if s is None else self.state_type.from_state_dict(s, device)
                      for stage, s in (saved or {}).items()}


def stage_index(model: nn.Module) -> int:
    """Which of this rank's virtual pipeline stages `model` is (0 without interleaving)."""
    return getattr(model, "vp_stage", None) or 0


def _loss_func(mask: torch.Tensor, scale: float, per_token: torch.Tensor):
    """per_token, mask: (B, T) -> (the loss to differentiate, what the step reports)."""
    masked_sum = (per_token.float() * mask).sum()
    loss = masked_sum * scale
    # the schedule divides `loss` in place: report clones
    return loss, {"loss": loss.detach().clone(), "sum": masked_sum.detach().clone(),
                  "count": mask.sum().detach()}


def _model_kwargs(model: nn.Module, batch: Batch) -> dict:
    """Extra forward arguments: the document starts inside each sample when the trainer resets
    there (data.reset_at_doc_boundaries; the engine tags the stages)."""
    if getattr(model, "doc_resets", False) and batch.doc_start is not None:
        return {"doc_start": batch.doc_start.bool()}
    return {}


def _forward_step(scale: float, carry: StateCarry | None, data_iterator, model):
    batch: Batch = next(data_iterator)
    kwargs = _model_kwargs(model, batch)
    if carry is not None:
        key = stage_index(model)
        state = carry.take(key, batch.reset, batch.tokens.shape[0])
        out = model(batch.tokens, batch.labels, state=state, return_state=True, **kwargs)
        if isinstance(out, tuple):  # a non-last stage: (hidden states, its layers' state)
            out, new_state = out
        else:
            new_state = out.state
        carry.put(key, new_state)
    else:
        out = model(batch.tokens, batch.labels, **kwargs)
    if not isinstance(out, torch.Tensor):  # the model's output type: the last stage
        return out.loss, partial(_loss_func, batch.loss_mask, scale)  # (B, T) per-token loss
    return out, partial(_loss_func, batch.loss_mask, scale)  # hidden states for the next stage


def _global_mean(local: float, contributes: bool, ctx: ParallelContext) -> float:
    """Average over DP of the value held by the ranks that `contribute` (one per DP replica)."""
    t = torch.tensor([local if contributes else 0.0], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.item() / ctx.dp_size


def _dp_sum(value: float, ctx: ParallelContext) -> float:
    """Summed over DP x CP: every rank that holds different tokens of the step."""
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    if ctx.dp_cp_size > 1:
        dist.all_reduce(t, group=ps.get_data_parallel_group(with_context_parallel=True))
    return t.item()


def accumulated_grad(p: nn.Parameter) -> torch.Tensor | None:
    """The gradient accumulated over this step's micro-batches: fp32 `_hp_grad` (DeepSpeed's
    BF16_Optimizer with immediate_grad_update, bf16 runs) or `.grad` (fp32 runs)."""
    return p.grad if p.grad is not None else getattr(p, "_hp_grad", None)


def allreduce_sequence_parallel_grads(stages: list[nn.Module], ctx: ParallelContext) -> None:
    """Sum over TP the gradients of parameters tagged `sequence_parallel` (norms seeing one
    sequence shard each), as megatron's finalize_model_grads does. Under bf16 the accumulated
    gradient is the fp32 one DeepSpeed's BF16_Optimizer keeps (`_hp_grad`; `.grad` was freed)."""
    if ctx.tp.size == 1:
        return
    grads = [g for c in stages for p in c.parameters()
             if getattr(p, "sequence_parallel", False) and (g := accumulated_grad(p)) is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=ctx.tp.group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def train_step(engine, stages: list[nn.Module], ctx: ParallelContext, batch: Batch, micro_batch_size: int,
               lr: float, zero_stage: int, carry: StateCarry | None = None) -> StepResult:
    """batch: (B, T) tensors, this DP rank's share of the global batch."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    batch = batch.context_slice(ctx.cp.size, ctx.cp.rank)  # this CP rank's slice of every sample
    micro = batch.to(ctx.device).split(micro_batch_size)
    n_tokens = _dp_sum(float(batch.loss_mask.sum()), ctx)  # the whole global batch's (DP x CP)
    scale = len(micro) * ctx.dp_size / max(n_tokens, 1.0)
    if zero_stage >= 2:
        if len(stages) != 1 or ctx.pp_size != 1:
            raise ValueError(f"parallel.zero_stage={zero_stage} needs parallel.pipeline=1")
        total = 0.0
        for mb in micro:
            state = carry.take(0, mb.reset, mb.tokens.shape[0]) if carry is not None else None
            out = engine(mb.tokens, mb.labels, state=state, **_model_kwargs(stages[0], mb))
            if carry is not None:
                carry.put(0, out.state)
            loss, _ = _loss_func(mb.loss_mask, scale, out.loss)
            # scales by 1 / gradient_accumulation_steps; DeepSpeed averages over DP x CP, so CP's
            # factor comes back here (megatron's schedule multiplies by it on the path below)
            engine.backward(loss * ctx.cp.size)
            engine.step()  # steps only at the accumulation boundary (the last micro-batch)
            total += loss.item()
        local, holds_loss = total / len(micro), ctx.tp.rank == 0
    else:
        model = stages if len(stages) > 1 else stages[0]
        iters = [iter(micro) for _ in stages]
        data_iterator = iters if len(stages) > 1 else iters[0]
        engine.set_gradient_accumulation_boundary(False)
        losses = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, scale, carry), data_iterator=data_iterator, model=model,
            num_microbatches=len(micro), micro_batch_size=micro_batch_size, forward_only=False,
            # the whole sample's length: megatron's schedule divides it by CP for the p2p shapes
            seq_length=batch.tokens.shape[1] * ctx.cp.size,
        )
        allreduce_sequence_parallel_grads(stages, ctx)
        engine.set_gradient_accumulation_boundary(True)
        engine.allreduce_gradients()
        engine.step()
        holds_loss = ctx.is_last_stage and ctx.tp.rank == 0
        local = sum(d["loss"].item() for d in losses) / len(micro) if holds_loss else 0.0
    loss = _global_mean(local, holds_loss, ctx)
    applied = engine.was_step_applied()
    if applied and not math.isfinite(loss):
        raise RuntimeError(f"loss {loss} is not finite but DeepSpeed applied the step "
                           f"(parallel.zero_stage={zero_stage} does not skip bad steps)")
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else None
    return StepResult(loss=loss, grad_norm=norm, lr=lr, skipped=not applied, tokens=int(n_tokens))


def eval_step(stages: list[nn.Module], ctx: ParallelContext, batches: list[Batch], micro_batch_size: int,
              carry: StateCarry | None = None) -> float:
    """Mean masked per-token loss over `batches` (this DP rank's shares; averaged over DP by
    token count): forward only, through the same megatron schedule, dropout off, no grad."""
    micro = [mb for b in batches for mb in b.context_slice(ctx.cp.size, ctx.cp.rank).to(ctx.device)
             .split(micro_batch_size)]
    modes = [c.training for c in stages]
    for c in stages:
        c.eval()
    try:
        with torch.no_grad():
            model = stages if len(stages) > 1 else stages[0]
            iters = [iter(micro) for _ in stages]
            out = get_forward_backward_func()(
                forward_step_func=partial(_forward_step, 1.0, carry),
                data_iterator=iters if len(stages) > 1 else iters[0], model=model,
                num_microbatches=len(micro), seq_length=batches[0].tokens.shape[1],
                micro_batch_size=micro_batch_size, forward_only=True,
            )
    finally:
        for c, m in zip(stages, modes, strict=True):
            c.train(m)
    holds = ctx.is_last_stage and ctx.tp.rank == 0
    t = torch.tensor([sum(d["sum"].item() for d in out), sum(d["count"].item() for d in out)]
                     if holds else [0.0, 0.0], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return (t[0] / t[1].clamp_min(1)).item()
