"""The parallel context: built once at start, then passed down explicitly.

It owns torch.distributed initialisation and megatron-core's parallel_state (whose
schedules and cross-entropy read it), and hands the model the groups it needs. Model code
never reads process groups from globals: it receives a `TensorParallel` view.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megaret.config.schema import ConfigError
from megaret.parallel.cpu_adapters import apply_cpu_adapters, seed_tensor_parallel_rng
from megaret.parallel.launch_env import discover_launch_env, set_cuda_launch_env
from megaret.parallel.peers import announce


@dataclass(frozen=True)
class TensorParallel:
    """What a tensor-parallel module needs to know: its group, size and rank."""

    group: dist.ProcessGroup | None
    size: int
    rank: int


@dataclass(frozen=True)
class ContextParallel:
    """What a context-parallel module needs: its group, size and rank. Each CP rank holds the
    contiguous slice [rank * T / size, (rank + 1) * T / size) of every sample."""

    group: dist.ProcessGroup | None
    size: int
    rank: int


NO_CP = ContextParallel(None, 1, 0)


@dataclass(frozen=True)
class ParallelContext:
    """Ranks and process groups of one process in a TP x CP x DP x PP layout (megatron's
    order tp-cp-ep-dp-pp: TP innermost, then CP, so a CP group spans neighbouring TP groups)."""

    world_size: int
    rank: int
    local_rank: int
    device: torch.device
    backend: str
    tp: TensorParallel
    pp_size: int
    pp_rank: int
    pp_group: dist.ProcessGroup | None
    dp_size: int
    dp_rank: int
    dp_group: dist.ProcessGroup | None
    virtual_pipeline: int | None = None
    cp: ContextParallel = NO_CP
    dp_cp_group: dist.ProcessGroup | None = None  # DP x CP: where gradients are summed, ZeRO shards

    @property
    def dp_cp_size(self) -> int:
        """Ranks that see different tokens of one step: DP x CP (their gradients are summed)."""
        return self.dp_size * self.cp.size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackendError(ConfigError):
    """parallel.backend asks for something this machine cannot give (one-line message)."""


def resolve_backend(backend: str = "auto") -> str:
    """parallel.backend -> the torch.distributed backend: auto picks nccl when CUDA is available, else gloo.

    gloo means CPU ranks (tensors on the CPU, the CPU adapters on), nccl one GPU per rank."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise BackendError("parallel.backend=nccl needs a CUDA device and none is visible; "
                           "use parallel.backend=gloo (CPU ranks) or auto")
    if backend not in ("nccl", "gloo"):
        raise BackendError(f"parallel.backend={backend!r} is not one of auto, nccl, gloo")
    return backend


def rank_device(backend: str, local_rank: int) -> torch.device:
    """This rank's device: the CPU under gloo; under nccl GPU `local_rank % device_count` (a node
    with fewer visible GPUs than tasks, e.g. one GPU per task by CUDA_VISIBLE_DEVICES, still maps)."""
    if backend == "gloo":
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(
    backend: str = "auto", timeout_min: float = 30, timeout_s: float | None = None
) -> torch.device:
    """Initialise torch.distributed from env:// (torchrun style); a lone process gets a world of 1.
    Returns this rank's device (`rank_device`).

    srun and mpirun launches are translated to torch's variables first (`discover_launch_env`).
    Under nccl the GPU is chosen (`torch.cuda.set_device`) and bound to the process group
    (`device_id`) before it is created, with CUDA_DEVICE_MAX_CONNECTIONS=1 (what megatron's
    tensor-parallel overlap needs) unless the launcher set it already.
    `timeout_s` (else `timeout_min`) bounds every collective: a peer that stalls or dies makes the
    others raise instead of hanging (gloo and NCCL with async error handling honour it).
    """
    if dist.is_initialized():
        return rank_device(dist.get_backend(), int(os.environ.get("LOCAL_RANK", "0")))
    launch = discover_launch_env()
    backend = resolve_backend(backend)
    device = rank_device(backend, launch.local_rank)
    kwargs = {}
    if device.type == "cuda":
        set_cuda_launch_env()
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    timeout = timedelta(seconds=timeout_s) if timeout_s is not None else timedelta(minutes=timeout_min)
    if launch.source == "single":
        # A plain `python ...` run: a world of one on a free local port. The environment is
        # left alone so that child processes (tests, launchers) don't inherit a stale rank.
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                rank=0, world_size=1, timeout=timeout, **kwargs)
    else:
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return device


def launch_world_size() -> int:
    """The world this process is joining: the launcher's variables before initialisation, the
    group's after. Layout checks made with it run before any rank waits for another."""
    return dist.get_world_size() if dist.is_initialized() else discover_launch_env().world_size


def build_parallel_context(
    tensor: int = 1,
    pipeline: int = 1,
    virtual_pipeline: int | None = None,
    seed: int = 1234,
    backend: str = "auto",
    timeout_s: float = 1800.0,
    context_parallel: int = 1,
) -> ParallelContext:
    """Initialise distributed state for a TP x CP x PP x DP layout and return the context.

    `context_parallel` (parallel.context_parallel) is megatron's context_parallel_size: its
    groups come from megatron-core's parallel_state, built once here.

    `backend` is parallel.backend (auto | nccl | gloo, `resolve_backend`); the CPU adapters for
    megatron-core are on exactly when the ranks run on the CPU. `timeout_s` (config
    train.collective_timeout_s) bounds every collective of the world and of megatron's groups."""
    from megatron.core import parallel_state as ps

    world = launch_world_size()
    model = tensor * pipeline * context_parallel
    if world % model != 0:  # before the rendezvous: every rank says so, none waits
        raise ConfigError(
            f"world size {world} is not divisible by parallel.tensor*parallel.pipeline*"
            f"parallel.context_parallel={tensor}*{pipeline}*{context_parallel}; launch a multiple of "
            f"{model} processes or change the layout"
        )
    device = init_distributed(backend, timeout_s=timeout_s)
    apply_cpu_adapters(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        context_parallel_size=context_parallel,
        create_gloo_process_groups=False,
        distributed_timeout_minutes=timeout_s / 60,
    )
    tp_rank = ps.get_tensor_model_parallel_rank()
    seed_tensor_parallel_rng(seed, tp_rank)
    dist.barrier()  # every rank is connected before any may fail and leave (a peer would see a reset)
    announce(dist.get_rank(), world)  # host and address in the job's store: a lost peer can be named
    return ParallelContext(
        world_size=world,
        rank=dist.get_rank(),
        local_rank=local_rank,
        device=device,
        backend=dist.get_backend(),
        tp=TensorParallel(ps.get_tensor_model_parallel_group(), tensor, tp_rank),
        pp_size=pipeline,
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_group=ps.get_data_parallel_group(),
        virtual_pipeline=virtual_pipeline,
        cp=ContextParallel(ps.get_context_parallel_group(), context_parallel, ps.get_context_parallel_rank()),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
    )


def destroy_parallel_context() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def dropout_seed_offset(dp_rank: int, pp_rank: int, pp_size: int, cp_rank: int = 0, cp_size: int = 1) -> int:
    """What a rank adds to train.seed for its dropout streams: 100 per (DP rank, CP rank, stage)
    slot, so no two (DP, CP, PP) coordinates share a stream (and the TP streams, + 2718 + tp_rank,
    stay apart for TP < 82). CP=1 gives the offsets of a run without CP."""
    return 100 * ((dp_rank * cp_size + cp_rank) * pp_size + pp_rank)


def seed_dropout_streams(seed: int, ctx: ParallelContext) -> None:
    """Reseed this rank's default generator and megatron's tracker for dropout, once the model
    is built (its weights come from `seed` alone): the same streams on the TP peers of a DP rank
    and stage, different ones across DP ranks and stages (the rule: megaret/models/dropout.py)."""
    seed_tensor_parallel_rng(seed + dropout_seed_offset(ctx.dp_rank, ctx.pp_rank, ctx.pp_size, ctx.cp.rank,
                                                          ctx.cp.size), ctx.tp.rank)
