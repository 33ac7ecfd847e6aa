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
model chunk, the recurrent state of that chunk's layers after its last micro-batch, detached,
and feeds it to the chunk's next one (consecutive micro-batches and steps are consecutive
segments of the same slots). Under a pipeline each stage keeps the state of the layers it
owns: a stage runs its micro-batches in order whatever the schedule, and no gradient crosses
the carry, so the 1F1B and interleaved orders need nothing more; slots whose
`reset` flag is set start from a zero state (RetNet) or, for the windowed archs (BRT, sliding),
get `reset` passed to the model, which drops their cached block and restores BRT's learned
initial state. The causal Transformer's cache grows without bound: the engine refuses it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megaret.models.attention_layer import KVCache
from megaret.models.retnet import RetNet, RetNetState
from megaret.models.transformer import Transformer, TransformerState
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
    """Per model chunk (pipeline stage or virtual stage), the recurrent state its last micro-batch
    left for the next one (no gradient flows through it)."""

    def __init__(self) -> None:
        self.state: dict[int, Any] = {}  # chunk index -> RetNetState / TransformerState

    def take(self, chunk: int, reset: torch.Tensor | None, batch_size: int):
        """The state chunk `chunk` starts this micro-batch from; slots with `reset` (B,) start fresh."""
        state = self.state.get(chunk)
        if state is None:
            return None
        if isinstance(state, TransformerState):  # BRT / sliding: the model applies `reset` itself
            carried = _batch_of(state)
            if carried != batch_size:
                raise ValueError(f"carried state has batch {carried}, micro-batch has {batch_size}")
            return None if reset is not None and bool(reset.all()) else state
        if not isinstance(state, RetNetState):
            raise TypeError(f"carrying {type(state).__name__} across steps is not supported")
        if state.layers[0].shape[0] != batch_size:
            raise ValueError(f"carried state has batch {state.layers[0].shape[0]}, "
                             f"micro-batch has {batch_size}")
        if reset is None or not bool(reset.any()):
            return state
        if bool(reset.all()):
            return None  # every slot restarts: a fresh sequence, positions from 0
        keep = (~reset.bool()).to(state.layers[0].dtype).view(-1, 1, 1, 1)
        # Rotary angles are relative inside q.k and q.S, so a restarted slot may keep the shared offset.
        return RetNetState([s * keep.to(s.device) for s in state.layers], state.position)

    def put(self, chunk: int, state) -> None:
        self.state[chunk] = None if state is None else state.detach()

    def clear(self) -> None:
        self.state = {}

    # TEMPORARY: replaced by the state protocol at merge
    def state_dict(self) -> dict:
        """Tensors and plain containers (loadable with torch.load(weights_only=True))."""
        return {"chunks": {i: pack_state(s) for i, s in self.state.items()}}

    # TEMPORARY: replaced by the state protocol at merge
    def load_state_dict(self, obj: dict) -> None:
        """`state_dict()`'s form, or format 1's ({chunk: pack_state form})."""
        chunks = obj["chunks"] if "chunks" in obj else obj
        self.state = {int(i): unpack_state(s) for i, s in chunks.items()}


# TEMPORARY: replaced by the state protocol at merge (format 1's carried-state packing, moved here
# from megaret/train/checkpoint.py)
def _state_types() -> dict[str, type]:
    from megaret.models.brt_layer import BRTLayerState

    return {c.__name__: c for c in (RetNetState, TransformerState, BRTLayerState, KVCache)}


# TEMPORARY: replaced by the state protocol at merge
def pack_state(obj: Any) -> Any:
    """A carried state -> tensors and plain containers (loadable with weights_only=True)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        name = type(obj).__name__
        if name not in _state_types():
            raise TypeError(f"cannot checkpoint a carried state of type {name}; "
                            f"known: {sorted(_state_types())}")
        return {"__state_type__": name,
                "fields": {f.name: pack_state(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict):
        return {k: pack_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(pack_state(v) for v in obj)
    if obj is None or isinstance(obj, (torch.Tensor, int, float, bool, str)):
        return obj.detach().cpu().clone() if isinstance(obj, torch.Tensor) else obj
    raise TypeError(f"cannot checkpoint a carried state holding {type(obj).__name__}")


# TEMPORARY: replaced by the state protocol at merge
def unpack_state(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__state_type__" in obj:
            cls = _state_types()[obj["__state_type__"]]
            return cls(**{k: unpack_state(v) for k, v in obj["fields"].items()})
        return {k: unpack_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(unpack_state(v) for v in obj)
    return obj


def chunk_index(model) -> int:
    """Which of this rank's model chunks `model` is (its virtual stage; 0 without interleaving)."""
    return getattr(model, "vp_stage", None) or 0


def _batch_of(state: TransformerState) -> int:
    """The batch size of a Transformer/BRT state (KVCache or BRTLayerState per layer)."""
    layer = next(s for s in state.layers if s is not None)
    return (layer.k if isinstance(layer, KVCache) else layer.state).shape[0]


def _loss_func(mask: torch.Tensor, scale: float, per_token: torch.Tensor):
    """per_token, mask: (B, T) -> (the loss to differentiate, what the step reports)."""
    masked_sum = (per_token.float() * mask).sum()
    loss = masked_sum * scale
    # the schedule divides `loss` in place: report clones
    return loss, {"loss": loss.detach().clone(), "sum": masked_sum.detach().clone(),
                  "count": mask.sum().detach()}


def _model_kwargs(model, batch: Batch, carry: StateCarry | None = None) -> dict:
    """Extra forward arguments: the document starts inside each sample when the trainer resets
    there (data.reset_at_doc_boundaries; the engine tags the chunks); with a carried state,
    the windowed archs' `reset` (B,) (drop the cached block, restore BRT's learned initial
    state at a slot's document start)."""
    kwargs = {}
    if carry is not None and isinstance(model, Transformer) and batch.reset is not None:
        kwargs["reset"] = batch.reset.bool()
    if getattr(model, "doc_resets", False) and batch.doc_start is not None:
        kwargs["doc_start"] = batch.doc_start.bool()
    return kwargs


def _forward_step(scale: float, carry: StateCarry | None, data_iterator, model):
    batch: Batch = next(data_iterator)
    kwargs = _model_kwargs(model, batch, carry)
    if carry is not None:
        key = chunk_index(model)
        state = carry.take(key, batch.reset, batch.tokens.shape[0])
        out = model(batch.tokens, batch.labels, state=state, return_state=True, **kwargs)
        if isinstance(out, tuple):  # a non-last stage: (hidden states, its layers' state)
            out, new_state = out
        else:
            new_state = out.state
        carry.put(key, new_state)
    else:
        out = model(batch.tokens, batch.labels, **kwargs)
    if not isinstance(out, torch.Tensor):  # RetNetOutput / TransformerOutput: the last stage
        return out.loss, partial(_loss_func, batch.loss_mask, scale)  # (B, T) per-token loss
    return out, partial(_loss_func, batch.loss_mask, scale)  # hidden states for the next stage


def _global_mean(local: float, contributes: bool, ctx: ParallelContext) -> float:
    """Average over DP of the value held by the ranks that `contribute` (one per DP replica)."""
    t = torch.tensor([local if contributes else 0.0], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.item() / ctx.dp_size


def _dp_sum(value: float, ctx: ParallelContext) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    if ctx.dp_size > 1:
        dist.all_reduce(t, group=ps.get_data_parallel_group())
    return t.item()


def allreduce_sequence_parallel_grads(chunks: list[RetNet], ctx: ParallelContext) -> None:
    """Sum over TP the gradients of parameters tagged `sequence_parallel` (norms seeing one
    sequence shard each), as megatron's finalize_model_grads does."""
    if ctx.tp.size == 1:
        return
    grads = [p.grad for c in chunks for p in c.parameters()
             if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=ctx.tp.group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def train_step(engine, chunks: list[RetNet], ctx: ParallelContext, batch: Batch, micro_batch_size: int,
               lr: float, zero_stage: int, carry: StateCarry | None = None) -> StepResult:
    """batch: (B, T) tensors, this DP rank's share of the global batch."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    micro = batch.to(ctx.device).split(micro_batch_size)
    n_tokens = _dp_sum(float(batch.loss_mask.sum()), ctx)
    scale = len(micro) * ctx.dp_size / max(n_tokens, 1.0)
    if zero_stage >= 2:
        if len(chunks) != 1 or ctx.pp_size != 1:
            raise ValueError(f"parallel.zero_stage={zero_stage} needs parallel.pipeline=1")
        total = 0.0
        for mb in micro:
            state = carry.take(0, mb.reset, mb.tokens.shape[0]) if carry is not None else None
            out = engine(mb.tokens, mb.labels, state=state, **_model_kwargs(chunks[0], mb, carry))
            if carry is not None:
                carry.put(0, out.state)
            loss, _ = _loss_func(mb.loss_mask, scale, out.loss)
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
            forward_step_func=partial(_forward_step, scale, carry), data_iterator=data_iterator, model=model,
            num_microbatches=len(micro), seq_length=batch.tokens.shape[1], micro_batch_size=micro_batch_size,
            forward_only=False,
        )
        allreduce_sequence_parallel_grads(chunks, ctx)
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


def eval_step(chunks: list[RetNet], ctx: ParallelContext, batches: list[Batch], micro_batch_size: int,
              carry: StateCarry | None = None) -> float:
    """Mean masked per-token loss over `batches` (this DP rank's shares; averaged over DP by
    token count): forward only, through the same megatron schedule, dropout off, no grad."""
    micro = [mb for b in batches for mb in b.to(ctx.device).split(micro_batch_size)]
    modes = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        with torch.no_grad():
            model = chunks if len(chunks) > 1 else chunks[0]
            iters = [iter(micro) for _ in chunks]
            out = get_forward_backward_func()(
                forward_step_func=partial(_forward_step, 1.0, carry),
                data_iterator=iters if len(chunks) > 1 else iters[0], model=model,
                num_microbatches=len(micro), seq_length=batches[0].tokens.shape[1],
                micro_batch_size=micro_batch_size, forward_only=True,
            )
    finally:
        for c, m in zip(chunks, modes, strict=True):
            c.train(m)
    holds = ctx.is_last_stage and ctx.tp.rank == 0
    t = torch.tensor([sum(d["sum"].item() for d in out), sum(d["count"].item() for d in out)]
                     if holds else [0.0, 0.0], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return (t[0] / t[1].clamp_min(1)).item()
