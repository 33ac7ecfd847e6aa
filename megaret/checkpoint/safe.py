"""Loading checkpoint files without executing code from them.

Every `.pt` file is read with ``torch.load(weights_only=True)``: the restricted unpickler
accepts tensors, containers and primitive values, plus the few DeepSpeed types listed in
`deepspeed_safe_globals()` (found by loading real ZeRO-0/1/2/3 fp32 and bf16 checkpoints).
A file naming anything else (e.g. an object whose ``__reduce__`` calls ``os.system``) is
refused with an UnpicklingError before any of it runs. DeepSpeed's own loader uses
``weights_only=False``; `SafeCheckpointEngine` replaces it on the engine.
"""

from __future__ import annotations

import functools
import importlib
import pickle
from collections.abc import Callable
from typing import Any

import torch

from megaret.checkpoint.files import CheckpointError

# (module, name) of the non-tensor types DeepSpeed 0.19 pickles into its checkpoint files
_DEEPSPEED_TYPES = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),  # ZeRO optimizer state: loss_scaler
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),  # ZeRO optimizer state: zero_stage
    ("deepspeed.utils.tensor_fragment", "fragment_address"),  # ZeRO-1/2 param_slice_mappings
)


@functools.cache
def deepspeed_safe_globals() -> list[Any]:
    out = []
    for module, name in _DEEPSPEED_TYPES:
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: it will say what it lacks
            pass
    return out


def safe_load(path: Any, map_location: Any = "cpu") -> Any:
    """torch.load restricted to tensors, plain containers and the allowlisted DeepSpeed types.

    Raises CheckpointError (naming the file) for a file that needs anything else.
    """
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines() or [""]
        detail = next((ln.strip() for ln in lines if "GLOBAL" in ln), lines[0])
        raise CheckpointError(f"{path} was refused: loading it would need a type outside the weights-only "
                              f"allowlist, i.e. it could run code ({detail})") from None


def install_safe_loading(engine: Any) -> None:
    """Make a DeepSpeed engine read its checkpoint files through `safe_load`."""
    engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine)


class SafeCheckpointEngine:
    """Wraps DeepSpeed's checkpoint engine: saving unchanged, loading with weights_only=True."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, "cpu" if map_location is None else map_location)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return getattr(self.inner, name)
