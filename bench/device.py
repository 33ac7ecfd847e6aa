"""What the benchmarks share to measure a GPU as well as the CPU: --device / --dtype / --warmup
arguments and a clock that times one call with CUDA events on a GPU (wall time on the CPU).

Inputs are made before the clock starts, so data generation is never timed. On a GPU each timed
call is bracketed by two events on the current stream and the device is synchronized after it:
the time is the GPU's from the first kernel the call issues to the last, including any gap where
the GPU waits for the CPU to launch work (that is part of the call's cost).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_device_args(ap: argparse.ArgumentParser, warmup: int = 1) -> None:
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="model weights and activations")
    ap.add_argument("--warmup", type=int, default=warmup,
                    help="untimed calls first (CUDA: kernel selection, autotuning, allocator)")


def resolve(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The device and dtype the arguments ask for; a parser error when CUDA is asked for and absent."""
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    if args.device == "cuda":
        return torch.device("cuda", torch.cuda.current_device()), DTYPES[args.dtype]
    return torch.device("cpu"), DTYPES[args.dtype]


class Clock:
    """Times single calls on `device`: CUDA events on a GPU, perf_counter on the CPU (seconds)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def times(self, fn: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
        """`warmup` untimed calls, then `reps` timed ones."""
        for _ in range(warmup):
            fn()
        self.sync()
        return [self.time(fn) for _ in range(reps)]


def describe(device: torch.device) -> str:
    """'cpu' or the CUDA card's name and memory, for titles and JSON."""
    if device.type != "cuda":
        return "cpu"
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} ({props.total_memory / 2**30:.1f} GiB)"
