"""One optimizer step: micro-batches forward/backward, gradient reduction, the ZeRO step.

ZeRO-0/1: megatron-core's schedule (no pipelining, 1F1B or interleaved) runs the micro-
batches and accumulates gradients in the parameters; DeepSpeed then reduces them over DP and
steps. ZeRO-2/3 (PP=1 only): DeepSpeed's own forward/backward per micro-batch, since it
reduces gradients inside each backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from megaret.models.retnet import RetNet, RetNetOutput
from megaret.parallel.context import ParallelContext


@dataclass
class StepResult:
    loss: float  # mean per-token loss over the global batch (NaN/inf when the step was bad)
    grad_norm: float | None  # global gradient norm before clipping
    lr: float
    skipped: bool  # no parameter update (non-finite loss or gradients)


def _loss_func(per_token: torch.Tensor):
    loss = per_token.mean()
    return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place


def _forward_step(data_iterator, model: RetNet):
    tokens, labels = next(data_iterator)
    out = model(tokens, labels)
    if isinstance(out, RetNetOutput):
        return out.loss, _loss_func  # (B, T) per-token loss on the last stage
    return out, _loss_func  # hidden states for the next stage


def _global_mean(local: float, contributes: bool, ctx: ParallelContext) -> float:
    """Average over DP of the value held by the ranks that `contribute` (one per DP replica)."""
    t = torch.tensor([local if contributes else 0.0], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.item() / ctx.dp_size


def train_step(engine, chunks: list[RetNet], ctx: ParallelContext, tokens: torch.Tensor,
               labels: torch.Tensor, micro_batch_size: int, lr: float, zero_stage: int) -> StepResult:
    """tokens, labels: (B, T), this DP rank's share of the global batch."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    micro = list(zip(tokens.to(ctx.device).split(micro_batch_size),
                     labels.to(ctx.device).split(micro_batch_size), strict=True))
    if zero_stage >= 2:
        if len(chunks) != 1 or ctx.pp_size != 1:
            raise ValueError(f"parallel.zero_stage={zero_stage} needs parallel.pipeline=1")
        total = 0.0
        for x, y in micro:
            loss = engine(x, y).loss.mean()
            engine.backward(loss)  # scales by 1 / gradient_accumulation_steps
            engine.step()  # steps only at the accumulation boundary (the last micro-batch)
            total += loss.item()
        local, holds_loss = total / len(micro), ctx.tp.rank == 0
    else:
        model = chunks if len(chunks) > 1 else chunks[0]
        iters = [iter(micro) for _ in chunks]
        data_iterator = iters if len(chunks) > 1 else iters[0]
        engine.set_gradient_accumulation_boundary(False)
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=data_iterator, model=model,
            num_microbatches=len(micro), seq_length=tokens.shape[1], micro_batch_size=micro_batch_size,
            forward_only=False,
        )
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
    return StepResult(loss=loss, grad_norm=norm, lr=lr, skipped=not applied)
