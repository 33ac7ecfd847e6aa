"""Context parallelism on CPU ranks: peak memory per rank and step time against T, and the bytes
the CP retention communicates.

    python -m torch.distributed.run --nproc_per_node CP bench/context_parallel.py T [T ...]

Each rank builds a tiny-width RetNet (per-layer recompute, small retention chunk), takes its slice
of one sample of length T, runs forward + backward once to warm up and once timed. Rank 0 prints
one row per T: CP, T, the slice, step seconds, the peak resident memory of the ranks (max over
ranks, growth over the process's size before the first step) and the bytes one rank receives in
the CP all-gathers per step, counted at the all-gather, beside the arithmetic
(cp - 1) * B * H * (Dk * Dv + 1) * 4 per layer, forward and backward.
"""

from __future__ import annotations

import resource
import sys
import time

import torch
import torch.distributed as dist

from megaret.config import load_config
from megaret.models.retnet import RetNet
from megaret.parallel import retention_cp
from megaret.parallel.context import build_parallel_context, destroy_parallel_context
from megaret.parallel.megatron_config import megatron_config
from megaret.parallel.retention_cp import summary_bytes

RECEIVED = [0]  # bytes this rank received in the CP all-gathers of a step (counted where they happen)


def _counted(gather):
    def all_gather(flat: torch.Tensor, cp) -> torch.Tensor:
        RECEIVED[0] += (cp.size - 1) * flat.numel() * flat.element_size()
        return gather(flat, cp)
    return all_gather


retention_cp._all_gather = _counted(retention_cp._all_gather)

OVERRIDES = ["model.hidden_size=32", "model.num_heads=2", "model.num_layers=2", "model.ffn_hidden_size=64",
             "model.vocab_size=256", "model.chunk_size=64", "model.retention_kernel=torch"]


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    lengths = [int(a) for a in sys.argv[1:]] or [4096, 16384]
    cfg = load_config("configs/tiny.yaml", OVERRIDES)
    ctx = build_parallel_context(1, 1, seed=cfg.train.seed, context_parallel=_world())
    torch.manual_seed(0)
    model = RetNet(cfg.model, megatron_config(cfg.model, cfg.parallel), ctx.tp, cp=ctx.cp)
    model.recompute = True
    m = model.layers[0].retention
    base = peak_mib()
    if ctx.rank == 0:
        print("| CP | T | slice | step s | peak MiB/rank (growth) | CP bytes/step/rank counted | arithmetic "
              "| formula |")
        print("|---|---|---|---|---|---|---|---|")
    for T in lengths:
        t_local = T // ctx.cp.size
        gen = torch.Generator().manual_seed(T)
        x = torch.randint(256, (1, T), generator=gen)[:, ctx.cp.rank * t_local:(ctx.cp.rank + 1) * t_local]
        seconds = 0.0
        for _ in range(2):  # warm-up, then timed
            model.zero_grad(set_to_none=True)
            RECEIVED[0] = 0
            t0 = time.perf_counter()
            out = model(x, x)
            out.loss.mean().backward()
            seconds = time.perf_counter() - t0
        peak = torch.tensor([peak_mib() - base])
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        t = torch.tensor([seconds])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        per_layer = summary_bytes(1, m.local_heads, m.key_dim, m.value_dim, ctx.cp.size)
        # forward all-gather, the recompute's forward again, and the backward's (twice the state)
        layers = len(model.layers)
        backward = 2 * (ctx.cp.size - 1) * m.local_heads * m.key_dim * m.value_dim * 4
        arithmetic = layers * (2 * per_layer + backward)
        if ctx.rank == 0:
            print(f"| {ctx.cp.size} | {T:,} | {t_local:,} | {t.item():.2f} | {peak.item():,.0f} | "
                  f"{RECEIVED[0]:,} | {arithmetic:,} | {layers} layers x (cp-1)={ctx.cp.size - 1} x "
                  f"H={m.local_heads} x "
                  f"(Dk*Dv+1)={m.key_dim * m.value_dim + 1} x 4 B x 2 (fwd + recompute) + backward |",
                  flush=True)
    destroy_parallel_context()


def _world() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


if __name__ == "__main__":
    main()
