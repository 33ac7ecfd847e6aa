"""RetNet's q/k/v/g projections: one fused column-parallel GEMM against four, side by side.

    python bench/fused_projection.py [--hidden 1024] [--tokens 4096] [--device cpu|cuda] [--dtype fp32|bf16]

Builds the fused `qkvg_proj` (megaret/models/fused.py) and the four separate column-parallel
linears it replaced (same seed: the same weights), and times forward + backward of each on the same
input (median of --repeats after one warm-up). Prints one markdown row per form, then one line of
name=value pairs with their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megaret.config import load_config
from megaret.models.fused import qkvg_rows
from megaret.models.parallel_linear import column, fused_column
from megaret.parallel.context import build_parallel_context
from megaret.parallel.megatron_config import megatron_config


def timed(fn, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of forward + backward."""
    times = []
    for i in range(repeats + 1):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(x).float().sum().backward()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--value-factor", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    a = p.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    cfg = load_config("configs/tiny.yaml", [f"model.hidden_size={a.hidden}", f"model.num_heads={a.heads}",
                                            f"model.value_factor={a.value_factor}"])
    ctx = build_parallel_context(1, 1, seed=0, backend="gloo")
    config = megatron_config(cfg.model, cfg.parallel, dtype, bf16=dtype == torch.bfloat16)
    d, v = a.hidden, a.value_factor * a.hidden
    torch.manual_seed(0)
    separate = [column(d, n, config, ctx.tp).to(a.device) for n in (d, d, v, v)]
    torch.manual_seed(0)
    fused = fused_column(d, qkvg_rows(d, a.heads, a.value_factor), config, ctx.tp).to(a.device)
    x = torch.randn(a.tokens, 1, d, device=a.device, dtype=dtype, requires_grad=True)  # (T, B, d)
    forms = {
        "four GEMMs": lambda z: sum(lin(z)[0].float().sum() for lin in separate),  # no concatenation
        "fused GEMM": lambda z: fused(z)[0],
    }
    seconds = {name: timed(fn, x, a.repeats) for name, fn in forms.items()}
    print(f"| form | d={d}, Dv total={v}, tokens={a.tokens}, {a.device} {a.dtype}: fwd+bwd ms |")
    print("|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {1e3 * s:.2f} |")
    ratio = seconds["fused GEMM"] / seconds["four GEMMs"]
    print(f"bench=fused_projection hidden={d} tokens={a.tokens} device={a.device} dtype={a.dtype} "
          f"fused_over_four={ratio:.3f}")


if __name__ == "__main__":
    main()
