"""A decoding step replayed from a CUDA graph, for archs whose carried state keeps its shape
from one token to the next (the arch spec's `fixed_step_state`: RetNet's (B, H, Dk, Dv) per layer).

A one-token step of a 1.3B-width model launches a few hundred small kernels; on an H100/H200 the
launches, not the GEMMs, set its latency (bench/decoding.py: ~7 ms per token against 0.6 ms of
weight GEMMs). Captured once, the step replays as one graph launch:

    static token (B, 1), static state (layers + position as a 0-d tensor on the device)
        -> graph.replay() -> logits and the next state in the graph's own output tensors
        -> copied back into the static state (the next replay reads it there)

The model must not read tensors on the host during the step (no `.item()`, no data-dependent
branch); a capture that fails says why, and the caller keeps the eager step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megaret.models.spec import arch_spec

__all__ = ["GraphedStep", "graph_refusal"]


def graph_refusal(model: nn.Module, state: Any, device: torch.device) -> str | None:
    """Why a decoding step of `model` from `state` cannot be captured (None: it can)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device (the model is on {device})"
    if not arch_spec(model.cfg.arch).fixed_step_state:
        return f"model.arch={model.cfg.arch} carries a state that changes shape from token to token"
    if state is None or any(s is None for s in state.layers):
        return "no state to step from yet (capture after the prefill)"
    return None


class GraphedStep:
    """`step(token (B,)) -> logits (B, 1, V / tp)` from a CUDA graph captured at construction.

    `state` (after the prefill) is copied into static buffers; `self.state` is the carried state
    after the last step (its position an int again), equal to the eager steps' state.
    """

    def __init__(self, model: nn.Module, state: Any, form: str | None, warmup: int = 2) -> None:
        device = state.layers[0].device
        why = graph_refusal(model, state, device)
        if why is not None:
            raise ValueError(why)
        self._type = type(state)
        self._token = torch.zeros(state.layers[0].shape[0], 1, dtype=torch.long, device=device)  # (B, 1)
        self._layers = [s.clone() for s in state.layers]
        self._position = torch.tensor(int(state.position), dtype=torch.long, device=device)  # 0-d

        def run() -> Any:
            return model(self._token, state=self._type(self._layers, self._position), retention_mode=form)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(side):  # warm-up: lazy inits, cuBLAS workspaces
            for _ in range(warmup):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self._graph):
            self._out = run()

    @torch.no_grad()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """token (B,) -> logits (B, 1, V / tp) (a fresh tensor; the state advances by one token)."""
        self._token.copy_(token.view(-1, 1))
        self._graph.replay()
        for static, new in zip(self._layers, self._out.state.layers, strict=True):
            static.copy_(new)
        self._position.copy_(self._out.state.position)
        return self._out.logits.clone()

    @property
    def state(self) -> Any:
        """The carried state after the last step (copies; position as an int)."""
        return self._type([s.clone() for s in self._layers], int(self._position))
