"""Stage modules for this rank and the DeepSpeed ZeRO engine around them.

DeepSpeed shards optimizer state (and, at ZeRO-2/3, gradients/parameters) over the
data-parallel group only; it learns the layout from `MegatronMPU`, a thin view of
megatron-core's parallel_state (which `build_parallel_context` set up).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from megaret.config import Config, ConfigError
from megaret.config.schema import zero_pipeline_refusal
from megaret.models.layout import stage_layers
from megaret.models.spec import build_model
from megaret.parallel.context import ParallelContext
from megaret.parallel.megatron_config import megatron_config


class MegatronMPU:
    """The `mpu` object DeepSpeed asks for.

    Model parallel = TP x PP (DeepSpeed names checkpoint files mp_rank_XX by it and reduces
    the grad norm over it); tensor parallel = TP; data parallel = the ZeRO sharding group.
    """

    # DeepSpeed's name -> megatron's parallel_state getter (the model-parallel rank and size are
    # those of megatron's model-parallel group, TP x PP)
    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_pipe_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    # ZeRO's group is DP x CP (megatron's data-parallel group with context parallel): CP peers see
    # different tokens of the same samples, so their gradients are reduced like DP's
    get_data_parallel_group = staticmethod(lambda: ps.get_data_parallel_group(with_context_parallel=True))
    get_data_parallel_rank = staticmethod(lambda: ps.get_data_parallel_rank(with_context_parallel=True))
    get_data_parallel_world_size = staticmethod(
        lambda: ps.get_data_parallel_world_size(with_context_parallel=True))

    @staticmethod
    def get_model_parallel_rank() -> int:
        return dist.get_rank(ps.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return dist.get_world_size(ps.get_model_parallel_group())


class StageModules(nn.Module):
    """This rank's virtual stages (one, or several with an interleaved schedule) as one module
    for DeepSpeed; megatron's schedules get the stages themselves."""

    def __init__(self, stages: list[nn.Module]) -> None:
        super().__init__()
        # (named `chunks`, megatron's word, because DeepSpeed's checkpoint files key every
        # parameter by it: chunks.<virtual stage>.<name>)
        self.chunks = nn.ModuleList(stages)

    def forward(self, *args, **kwargs):  # the PP=1 engine path: one stage holds the whole model
        if len(self.chunks) != 1:
            raise RuntimeError("StageModules.forward runs only a single-stage (PP=1) model")
        return self.chunks[0](*args, **kwargs)


def micro_batches_per_step(cfg: Config, dp_size: int) -> int:
    """Gradient-accumulation micro-batches per optimizer step on each DP rank."""
    per_step = cfg.train.micro_batch_size * dp_size
    if cfg.train.global_batch_size % per_step:
        raise ValueError(f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by "
                         f"train.micro_batch_size*dp={per_step}")
    return cfg.train.global_batch_size // per_step


def build_stage_modules(cfg: Config, ctx: ParallelContext) -> list[nn.Module]:
    """The virtual stages this rank holds (any model.arch, built through its spec), initialised
    exactly like the same layers of the full model. (The config already refused what the
    trainer cannot run: Config.validate.)"""
    bf16 = cfg.train.precision == "bf16"
    config = megatron_config(cfg.model, cfg.parallel, torch.bfloat16 if bf16 else torch.float32, bf16=bf16)
    vp = cfg.parallel.virtual_pipeline or 1
    stages = []
    for v in range(vp):
        layers, pre, post = stage_layers(cfg.model.num_layers, ctx.pp_size, ctx.pp_rank, vp, v)
        torch.manual_seed(cfg.train.seed)  # every stage draws the same base seed as the full model
        stage = build_model(cfg.model, config, ctx.tp, pre_process=pre, post_process=post, layers=layers,
                            **({"cp": ctx.cp} if ctx.cp.size > 1 else {}))
        stage.vp_stage = v if vp > 1 else None  # megatron's interleaved schedule checks it
        stage.recompute = cfg.train.recompute
        # the step function passes batch.doc_start to the model (resets inside packed samples)
        stage.doc_resets = cfg.data.reset_at_doc_boundaries
        stages.append(stage.to(ctx.device))
    return stages


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms' gains are not decayed."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def fp32_grad_accumulation(cfg: Config) -> bool:
    """bf16 under ZeRO-0/1: each micro-batch's bf16 gradient is added into a persistent fp32
    gradient and freed (DeepSpeed's BF16_Optimizer with immediate_grad_update: a post-accumulate-grad
    hook per parameter, megatron's main_grad pattern), the data-parallel reduction runs on those fp32
    gradients and the optimizer steps its fp32 masters from them. ZeRO-2/3 reduce inside DeepSpeed's
    own backward, where its optimizer keeps the gradients."""
    return cfg.train.precision == "bf16" and cfg.parallel.zero_stage <= 1


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    n_micro = micro_batches_per_step(cfg, dp_size)
    fp32_accum = fp32_grad_accumulation(cfg)
    # DeepSpeed picks its BF16_Optimizer only for ZeRO stage 1 with fp32 accumulation; its fp32
    # masters are sharded over DP like ZeRO-1's, so parallel.zero_stage=0 runs it too under bf16
    zero_stage = max(cfg.parallel.zero_stage, 1) if fp32_accum else cfg.parallel.zero_stage
    # and DeepSpeed would reduce a bf16 run's gradients in bf16 (communication_data_type's default)
    extra = ({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
             if fp32_accum else {})
    return {**extra,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": n_micro,
        # DeepSpeed counts a sample once per DP x CP rank (each CP rank holds a slice of it)
        "train_batch_size": cfg.train.global_batch_size * cfg.parallel.context_parallel,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": float(cfg.optimizer.clip_grad),  # DeepSpeed would default to 1.0
        "bf16": {"enabled": cfg.train.precision == "bf16", "immediate_grad_update": fp32_accum},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: Config, ctx: ParallelContext, stages: list[nn.Module]):
    """deepspeed.initialize over this rank's stages with a client AdamW; returns the engine."""
    # the config refused these already; the layout the engine really gets is checked by the same code
    if message := zero_pipeline_refusal(cfg.parallel.zero_stage, ctx.pp_size, cfg.optimizer.clip_grad):
        raise ConfigError(message)
    # DeepSpeed would JIT-compile its shared-memory comm op (minutes); gloo does not need it.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))  # a plain one-process run lacks it
    deepspeed.init_distributed(dist_backend=ctx.backend)
    module = StageModules(stages)
    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(_param_groups(module, opt.weight_decay), lr=opt.lr,
                                  betas=tuple(opt.betas), eps=opt.eps)
    printed = io.StringIO()  # BF16_Optimizer print()s memory reports: to DeepSpeed's log, off stdout
    with contextlib.redirect_stdout(printed):
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, mpu=MegatronMPU(),
                                          config=deepspeed_config(cfg, ctx.dp_size))
    for line in printed.getvalue().splitlines():
        deepspeed.utils.logger.info(line)
    return engine

