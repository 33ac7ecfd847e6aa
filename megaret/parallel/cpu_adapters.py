"""Adapters that let megatron-core 0.16 run on CPU with gloo.

megatron-core assumes CUDA in a handful of places. Each adapter below is small, applied
only when the ranks run on the CPU (`apply_cpu_adapters(device)`: parallel.backend=gloo, or
auto without CUDA; on a CUDA device it is off, and removed if an earlier context had it on),
and touches only megatron's own modules, never torch itself:

1. `torch.cuda.current_device()` passed as `device=`, `torch.cuda.synchronize()` and
   factory calls with `device="cuda"`: the megatron modules listed in
   `PATCHED_MODULES` see a `torch` whose `cuda.current_device()` is "cpu", whose
   `cuda.synchronize()` does nothing, and whose tensor factories map a CUDA device to
   the CPU. Everything else is the real torch.
2. The CUDA RNG tracker (used by dropout in tensor-parallel regions and by activation
   recomputation) gets a CPU twin: named CPU generator states forked around a block.

tests/test_cpu_adapters.py checks that every adapter is still needed by the installed
megatron-core (it fails when upstream changes, so a dead adapter is noticed) and that
each one works.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from collections.abc import Iterator
from typing import Any

import torch

# Megatron modules that call torch.cuda.current_device()/synchronize() or build tensors
# with device="cuda" on the code paths megaret uses.
PATCHED_MODULES: tuple[str, ...] = (
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.utils",
)

_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "zeros_like",
              "ones_like", "empty_like", "full_like")
_applied = False
_originals: dict[str, Any] = {}  # what apply_cpu_adapters replaced, to put back on a CUDA device
# the attributes of megatron.core.tensor_parallel.random that the CPU RNG tracker replaces
_RANDOM_ATTRS = ("_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED", "_get_cuda_rng_state",
                 "_set_cuda_rng_state")


def _to_cpu_device(device: Any) -> Any:
    """Map any CUDA device spec (\"cuda\", \"cuda:1\", 0, torch.device('cuda')) to the CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


class _CudaOnCpu:
    """Stands in for `torch.cuda` inside megatron modules when there is no GPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None


class _TorchOnCpu(types.ModuleType):
    """A `torch` module view whose CUDA devices resolve to the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaOnCpu()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in _FACTORIES:
            def factory(*args: Any, **kwargs: Any) -> Any:
                if "device" in kwargs:
                    kwargs["device"] = _to_cpu_device(kwargs["device"])
                return attr(*args, **kwargs)

            return factory
        return attr


class CpuRNGStatesTracker:
    """CPU twin of megatron's CudaRNGStatesTracker: named generator states to fork into.

    Inside `fork(name)` the default CPU generator runs from the named state; on exit the
    advanced state is stored back under that name and the caller's state is restored, so
    dropout in tensor-parallel regions differs per TP rank yet is reproducible, and
    recomputation replays exactly.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} is already tracked")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} is already tracked")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} was never added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _install_rng_tracker() -> None:
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Checkpointed recomputation saves and restores "the CUDA RNG state"; on CPU that is
    # the default CPU generator, which it also saves, so restoring it twice is harmless.
    random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)


def cpu_adapters_active() -> bool:
    """Whether the adapters are installed now."""
    return _applied


def apply_cpu_adapters(device: torch.device | None = None) -> bool:
    """Install the adapters for ranks on the CPU (default: when there is no CUDA device); remove
    them for a CUDA device. Returns whether they are active."""
    global _applied, _originals
    on_cpu = (device.type == "cpu") if device is not None else not torch.cuda.is_available()
    if not on_cpu:
        _remove()
        return False
    if _applied:
        return True
    torch_on_cpu = _TorchOnCpu()
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    _originals = {name: importlib.import_module(name).torch for name in PATCHED_MODULES}
    _originals.update({f"random.{k}": getattr(random, k) for k in _RANDOM_ATTRS})
    for name in PATCHED_MODULES:
        importlib.import_module(name).torch = torch_on_cpu
    _install_rng_tracker()
    _applied = True
    return True


def _remove() -> None:
    """Put back what `apply_cpu_adapters` replaced (megatron's own torch and CUDA RNG tracker)."""
    global _applied, _originals
    if not _applied:
        return
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    for key, value in _originals.items():
        if key.startswith("random."):
            setattr(random, key[len("random."):], value)
        else:
            importlib.import_module(key).torch = value
    _originals = {}
    _applied = False


def seed_tensor_parallel_rng(seed: int, tp_rank: int) -> None:
    """Seed the default generator (same on TP peers) and the TP-region generator (per rank).

    Mirrors megatron's model_parallel_cuda_manual_seed: the data-parallel region uses
    `seed`, the tensor-parallel region `seed + 2718 + tp_rank`. Called with train.seed when the
    parallel context is built (the weights), then with each rank's dropout seed once the model
    is built (`seed_dropout_streams`, megaret/parallel/context.py).
    """
    torch.manual_seed(seed)
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    if _applied:
        tracker = random.get_cuda_rng_tracker()
        tracker.reset()
        tracker.add(random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
        tracker.add(random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
        tracker.add(random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * tp_rank)
    else:
        random.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
