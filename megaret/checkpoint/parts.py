"""The pieces of training state a checkpoint holds, each saving and loading itself.

A checkpoint is a dict of parts (torchtitan's `Stateful` objects). The manager
(`megaret.checkpoint.manager`) calls ``part.save(directory)`` on every rank and keeps what it
returns: in ``manifest.json`` (JSON, rank 0's copy) for a ``shared`` part, whose state is the
same on every rank, else under the part's name in this rank's ``rank_NNNNN.pt``. At resume it
hands each part back its state with ``part.load(directory, state)`` (``None`` when the
checkpoint holds none), in the dict's order.

Most parts are `StatefulPart`s: their whole state is ``state_dict()``, loaded back with
``load_state_dict(state)``; a `CheckpointError` they raise says what is wrong with the
checkpoint and the manager's caller sees it after the checkpoint's path. The model and
optimizer part (`megaret.checkpoint.model.ModelOptimizer`) writes DeepSpeed's own files instead.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from megaret.checkpoint.files import CheckpointError


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


class Part(ABC):
    shared: ClassVar[bool] = False  # True: the same on every rank, kept (JSON) in manifest.json

    @abstractmethod
    def save(self, directory: Path) -> Any:
        """Write its files under `directory` if it has any (every rank calls this); returns the
        state the manager keeps for it."""

    @abstractmethod
    def load(self, directory: Path, state: Any) -> str | None:
        """Restore from the checkpoint in `directory` and the state `save` returned (None: the
        checkpoint has none); returns a line worth reporting, if any."""


class StatefulPart(Part):
    """A part whose whole state is its ``state_dict()``."""

    @abstractmethod
    def state_dict(self) -> Any: ...

    @abstractmethod
    def load_state_dict(self, state: Any) -> str | None: ...

    def save(self, directory: Path) -> Any:
        return self.state_dict()

    def load(self, directory: Path, state: Any) -> str | None:
        try:
            return self.load_state_dict(state)
        except CheckpointError as exc:
            raise CheckpointError(f"{directory} {exc}") from None


class Shared(StatefulPart):
    """Any `Stateful` whose state is plain JSON data, the same on every rank (the trainer's counters)."""

    shared = True

    def __init__(self, inner: Stateful) -> None:
        self.inner = inner

    def state_dict(self) -> Any:
        return self.inner.state_dict()

    def load_state_dict(self, state: Any) -> str | None:
        if state is None:
            raise CheckpointError(f"holds no {type(self.inner).__name__} state")
        self.inner.load_state_dict(state)
        return None


SCHEDULE_KEYS = ("lr", "min_lr", "warmup_steps", "decay_style", "decay_power")


def schedule_settings(optimizer: Mapping[str, Any], total_steps: int) -> dict[str, Any]:
    """What megaret.train.schedule.learning_rate reads besides the step."""
    return {**{f"optimizer.{k}": optimizer.get(k) for k in SCHEDULE_KEYS}, "train.steps": total_steps}


class Schedule(StatefulPart):
    """The learning-rate schedule, a pure function of the step (megaret.train.schedule): its
    settings. This run's settings apply after a resume; a change is reported, not refused
    (e.g. more train.steps to train on)."""

    shared = True

    def __init__(self, optimizer: Any, total_steps: int) -> None:
        self.settings = schedule_settings(asdict(optimizer), total_steps)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.settings)

    def load_state_dict(self, state: dict[str, Any] | None) -> str | None:
        if state is None:
            return None
        changed = [f"{k}: saved {state.get(k)}, now {v}" for k, v in self.settings.items()
                   if state.get(k) != v]
        if not changed:
            return None
        return (f"the learning-rate schedule differs from the checkpoint's ({'; '.join(changed)}): "
                "this run's applies")


class RNG(StatefulPart):
    """torch (CPU and CUDA), Python, NumPy and megatron's tensor-parallel RNG streams of this rank."""

    def state_dict(self) -> dict[str, Any]:
        from megatron.core.tensor_parallel import random as mrandom

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
            "megatron": mrandom.get_cuda_rng_tracker().get_states(),
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        from megatron.core.tensor_parallel import random as mrandom

        if state is None:
            raise CheckpointError("holds no RNG state")
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        mrandom.get_cuda_rng_tracker().set_states(state["megatron"])


class DataPosition(StatefulPart):
    """Where this DP rank's data stream is: the loader's state_dict (data.source=synthetic has no
    loader: its batches are keyed by step). A loader position is tied to the data-parallel size."""

    def __init__(self, source: str, dp_size: int, loader: Stateful | None = None,
                 restart: Callable[[], None] | None = None) -> None:
        self.source, self.dp_size, self.loader, self.restart = source, dp_size, loader, restart

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source, "data_parallel": self.dp_size,
                "loader": self.loader.state_dict() if self.loader is not None else None}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is not None and state["source"] != self.source:
            raise CheckpointError(f"was saved with data.source={state['source']}, "
                                  f"this run has data.source={self.source}")
        if self.loader is None:
            return
        if state is None or state["loader"] is None:
            raise CheckpointError("holds no data-loader position")
        if state["data_parallel"] != self.dp_size:
            raise CheckpointError(
                f"was saved with {state['data_parallel']} data-parallel ranks, this run has {self.dp_size}; "
                f"the data-loader position of data.source={self.source} is tied to the data-parallel size: "
                f"keep {state['data_parallel']} data-parallel ranks (change tensor/pipeline with world size "
                "to match) or resume with the saved layout")
        self.loader.load_state_dict(state["loader"])
        if self.restart is not None:
            self.restart()  # the batch source forgets its iterator over the old position


def carry_layout(tensor: int, pipeline: int, virtual_pipeline: int | None, data: int) -> dict[str, Any]:
    """What a carried state's per-rank layout depends on (TP-local heads, stage layers, DP slots)."""
    return {"tensor": tensor, "pipeline": pipeline, "virtual_pipeline": virtual_pipeline, "data": data}


class CarriedStates(StatefulPart):
    """The recurrent states stateful training (data.packing=segments) carries into the next step:
    a `megaret.train.step.StateCarry`, saved and loaded through its own state_dict methods. They
    are laid out per rank, so they load only into the layout that saved them."""

    def __init__(self, carry: Stateful, ctx: Any) -> None:
        self.carry, self.device = carry, ctx.device
        self.layout = carry_layout(ctx.tp.size, ctx.pp_size, ctx.virtual_pipeline, ctx.dp_size)

    def state_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "states": self.carry.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            return  # saved without carried states (data.packing=packed): start from none
        if state["layout"] != self.layout:
            raise CheckpointError("carries recurrent states across steps (data.packing=segments), which are "
                                  "laid out per rank: resume it with the saved layout")
        self.carry.load_state_dict(state["states"], self.device)  # the state protocol places it
