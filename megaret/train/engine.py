"""Stage modules for this rank and the DeepSpeed ZeRO engine around them.

DeepSpeed shards optimizer state (and, at ZeRO-2/3, gradients/parameters) over the
data-parallel group only; it learns the layout from `MegatronMPU`, a thin view of
megatron-core's parallel_state (which `build_parallel_context` set up).
"""

from __future__ import annotations

import importlib
import logging
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from megaret.config import Config
from megaret.models.factory import build_model
from megaret.models.retnet import RetNet
from megaret.models.stage import stage_layers
from megaret.parallel.context import ParallelContext
from megaret.parallel.megatron_config import megatron_config


class MegatronMPU:
    """The `mpu` object DeepSpeed asks for.

    Model parallel = TP x PP (DeepSpeed names checkpoint files mp_rank_XX by it and reduces
    the grad norm over it); tensor parallel = TP; data parallel = the ZeRO sharding group.
    """

    def get_model_parallel_group(self):
        return ps.get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(ps.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(ps.get_model_parallel_group())

    def get_tensor_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_rank(self) -> int:
        return ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return ps.get_pipeline_model_parallel_world_size()

    def get_pipe_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size()


class StageModules(nn.Module):
    """This rank's model chunks (one, or several with an interleaved schedule) as one module
    for DeepSpeed; megatron's schedules get the chunks themselves."""

    def __init__(self, chunks: list[RetNet]) -> None:
        super().__init__()
        self.chunks = nn.ModuleList(chunks)

    def forward(self, *args, **kwargs):  # the PP=1 engine path: one chunk holds the whole model
        if len(self.chunks) != 1:
            raise RuntimeError("StageModules.forward runs only a single-chunk (PP=1) model")
        return self.chunks[0](*args, **kwargs)


def micro_batches_per_step(cfg: Config, dp_size: int) -> int:
    """Gradient-accumulation micro-batches per optimizer step on each DP rank."""
    per_step = cfg.train.micro_batch_size * dp_size
    if cfg.train.global_batch_size % per_step:
        raise ValueError(f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by "
                         f"train.micro_batch_size*dp={per_step}")
    return cfg.train.global_batch_size // per_step


def check_training_features(cfg: Config) -> None:
    """Refuse, with the key to change, the combinations the trainer does not support."""
    arch = cfg.model.arch
    if cfg.data.packing == "segments" and arch == "transformer":
        raise ValueError(
            "data.packing=segments with model.arch=transformer: the causal Transformer's key/value "
            "cache grows with every segment, so it cannot be carried across training steps; use "
            "data.packing=packed (or model.arch=sliding / brt, whose carried caches are bounded)")
    if cfg.parallel.sequence_parallel and cfg.parallel.zero_stage >= 2:
        raise ValueError(
            f"parallel.sequence_parallel=true with parallel.zero_stage={cfg.parallel.zero_stage}: ZeRO-2/3 "
            "reduce gradients inside the backward, before the norms' sequence-parallel gradients are summed "
            "over tensor-parallel ranks; use parallel.zero_stage=1 (or 0)")


def build_stage_modules(cfg: Config, ctx: ParallelContext) -> list[nn.Module]:
    """The model chunks this rank holds (any model.arch, built by megaret.models.factory),
    initialised exactly like the same layers of the full model."""
    check_training_features(cfg)
    bf16 = cfg.train.precision == "bf16"
    config = megatron_config(cfg.model, cfg.parallel, torch.bfloat16 if bf16 else torch.float32, bf16=bf16)
    vp = cfg.parallel.virtual_pipeline or 1
    chunks = []
    for v in range(vp):
        layers, pre, post = stage_layers(cfg.model.num_layers, ctx.pp_size, ctx.pp_rank, vp, v)
        torch.manual_seed(cfg.train.seed)  # every chunk draws the same base seed as the full model
        chunk = build_model(cfg.model, config, ctx.tp, pre_process=pre, post_process=post, layers=layers)
        chunk.vp_stage = v if vp > 1 else None  # megatron's interleaved schedule checks it
        chunk.recompute = cfg.train.recompute
        # the step function passes batch.doc_start to the model (resets inside packed samples)
        chunk.doc_resets = cfg.data.reset_at_doc_boundaries
        chunks.append(chunk.to(ctx.device))
    return chunks


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms' gains are not decayed."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    n_micro = micro_batches_per_step(cfg, dp_size)
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": n_micro,
        "train_batch_size": cfg.train.global_batch_size,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": float(cfg.optimizer.clip_grad),  # DeepSpeed would default to 1.0
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: Config, ctx: ParallelContext, chunks: list[RetNet]):
    """deepspeed.initialize over this rank's chunks with a client AdamW; returns the engine."""
    if cfg.parallel.zero_stage >= 2 and ctx.pp_size > 1:
        raise ValueError(
            f"parallel.zero_stage={cfg.parallel.zero_stage} cannot run under a pipeline schedule "
            f"(pipeline={ctx.pp_size}): DeepSpeed ZeRO-2/3 reduce gradients inside each micro-batch; "
            "use parallel.zero_stage=1 or parallel.pipeline=1"
        )
    if cfg.parallel.zero_stage == 0 and ctx.pp_size > 1 and cfg.optimizer.clip_grad > 0:
        raise ValueError(
            f"parallel.zero_stage=0 with pipeline={ctx.pp_size}: DeepSpeed's ZeRO-0 gradient norm is wrong "
            "under a pipeline (so is clipping with optimizer.clip_grad); use parallel.zero_stage=1"
        )
    # DeepSpeed would JIT-compile its shared-memory comm op (minutes); gloo does not need it.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))  # a plain one-process run lacks it
    deepspeed.init_distributed(dist_backend=ctx.backend)
    module = StageModules(chunks)
    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(_param_groups(module, opt.weight_decay), lr=opt.lr,
                                  betas=tuple(opt.betas), eps=opt.eps)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, mpu=MegatronMPU(),
                                      config=deepspeed_config(cfg, ctx.dp_size))
    return engine

