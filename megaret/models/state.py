"""The state protocol: what a model carries from one call to the next, and what it can do.

Every arch returns its carried state as a `StackState`: one entry per layer of the stack (or of
the pipeline stage) and the absolute position of the next token. The layer entries know
themselves (`LayerState`): a retention state matrix (RetNet), a key/value cache (Transformer,
sliding window) or a block-recurrent state with its cache (BRT). Callers (the training-time
state carry, the checkpoint, generation, evaluation) use only this protocol:

    state.detach()              stop gradients (truncated backpropagation through time)
    state.reset(mask)           samples flagged in mask (B,) bool start afresh
    state.batch_size, .nbytes   the batch it carries and the bytes it holds
    state.state_dict()          tensors and plain containers (torch.load(weights_only=True))
    Type.from_state_dict(d)     the state back, on `device`

A layer entry of None means "no history yet" (before a layer's first call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

import torch


@runtime_checkable
class LayerState(Protocol):
    """What one layer carries (KVCache, BRTLayerState)."""

    @property
    def batch_size(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def detach(self) -> Self: ...

    def reset(self, mask: torch.Tensor | None) -> Self: ...

    def state_dict(self) -> dict[str, Any]: ...


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class StackState:
    """Per-layer states (None before a layer's first call) and the position of the next token.

    Subclasses say how one layer entry is detached, reset, measured, saved and rebuilt; the
    default treats entries as `LayerState` objects rebuilt by `_layer_from_state_dict`.
    """

    layers: list[Any]
    position: int

    # -- one layer entry (overridden where entries are not LayerState objects) -----------------

    @staticmethod
    def _layer_detach(s: Any) -> Any:
        return s.detach()

    @staticmethod
    def _layer_reset(s: Any, mask: torch.Tensor) -> Any:
        return s.reset(mask)

    @staticmethod
    def _layer_batch(s: Any) -> int:
        return s.batch_size

    @staticmethod
    def _layer_nbytes(s: Any) -> int:
        return s.nbytes

    @staticmethod
    def _layer_state_dict(s: Any) -> Any:
        return s.state_dict()

    layer_types: ClassVar[tuple[type, ...]] = ()  # LayerState classes from_state_dict can rebuild

    @classmethod
    def _layer_from_state_dict(cls, d: Any, device: torch.device | None) -> Any:
        """The LayerState class whose `state_keys` the saved entry holds rebuilds it."""
        for layer_type in cls.layer_types:
            if set(layer_type.state_keys) <= set(d):
                return layer_type.from_state_dict(d, device)
        raise ValueError(f"{cls.__name__}: no layer state has the keys {sorted(d)}")

    # -- the protocol ----------------------------------------------------------------------------

    def detach(self) -> Self:
        """Stop gradients at the segment boundary (truncated backpropagation through time)."""
        return type(self)([None if s is None else self._layer_detach(s) for s in self.layers], self.position)

    def reset(self, mask: torch.Tensor | None) -> Self:
        """The state with the samples flagged in mask (B,) bool starting afresh (None: unchanged).
        The position is shared: rotary angles are relative inside every mixer, so a restarted
        sample may keep the common offset."""
        if mask is None:
            return self
        mask = mask.bool()
        return type(self)([None if s is None else self._layer_reset(s, mask) for s in self.layers],
                          self.position)

    @property
    def batch_size(self) -> int:
        for s in self.layers:
            if s is not None:
                return self._layer_batch(s)
        raise ValueError(f"{type(self).__name__} holds no layer state yet")

    @property
    def nbytes(self) -> int:
        return sum(self._layer_nbytes(s) for s in self.layers if s is not None)

    def state_dict(self) -> dict[str, Any]:
        return {"layers": [None if s is None else self._layer_state_dict(s) for s in self.layers],
                "position": int(self.position)}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any], device: torch.device | str | None = None) -> Self:
        layers = [None if s is None else cls._layer_from_state_dict(s, device) for s in d["layers"]]
        return cls(layers, int(d["position"]))


def to_device(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    return t if device is None else t.to(device)
