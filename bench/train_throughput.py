"""Training throughput (forward+backward tokens/s): RetNet vs the Transformer baseline at
equal parameters (RetNet: FFN 2d, value/gate 2d; Transformer: FFN 4d; both ~12 d^2 per layer).

    python bench/train_throughput.py [--quick] [--hidden 256 --layers 2 --heads 4 --lengths 2048 8192]

Batch 1, fp32, CPU, no optimizer step (the optimizer costs the same for equal parameters).
RetNet trains with its chunkwise form (model.chunk_size); the Transformer with SDPA's causal
kernel. The two models alternate step by step at each length (interleaved, so both see the
same machine load); the fastest step gives tokens/s (the median is in the table too: on a
shared machine the minimum estimates a step's own cost).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import OUT_DIR, emit, median, save_plot  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="hidden 64, T in 512 and 2048")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--lengths", type=int, nargs="*", default=[2048, 8192])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    ap.add_argument("--plot", default=str(OUT_DIR / "train_throughput.png"))
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.vocab, args.lengths, args.reps = 64, 512, [512, 2048], 2

    import torch

    torch.set_num_threads(args.threads)
    from megaret.config import ModelConfig, ParallelConfig
    from megaret.models.spec import build_model
    from megaret.parallel.context import build_parallel_context
    from megaret.parallel.megatron_config import megatron_config

    ctx = build_parallel_context(1, 1, seed=0)
    d = args.hidden
    common = dict(vocab_size=args.vocab, hidden_size=d, num_layers=args.layers, num_heads=args.heads,
                  dropout=0.0)
    cfgs = {"retnet": ModelConfig(arch="retnet", ffn_hidden_size=2 * d, chunk_size=args.chunk, **common),
            "transformer": ModelConfig(arch="transformer", ffn_hidden_size=4 * d, **common)}
    models = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        models[name] = build_model(cfg, megatron_config(cfg, ParallelConfig()), ctx.tp)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    print(f"parameters: retnet {params['retnet']:,}  transformer {params['transformer']:,}", file=sys.stderr)

    def train_step(name: str, x: torch.Tensor) -> None:
        m = models[name]
        m.zero_grad(set_to_none=True)
        m(x, torch.roll(x, -1, 1)).loss.mean().backward()

    rows = []
    for t in args.lengths:
        x = torch.randint(args.vocab, (1, t))
        times = {n: [] for n in models}
        for rep in range(args.reps + 1):  # round 0 warms up
            for name in (list(models) if rep % 2 else list(models)[::-1]):
                t0 = time.perf_counter()
                train_step(name, x)
                if rep:
                    times[name].append(time.perf_counter() - t0)
        row = {"T": t}
        for name in models:
            row[f"{name}_tokens_per_s"] = round(t / min(times[name]), 1)
            row[f"{name}_median_tokens_per_s"] = round(t / median(times[name]), 1)
        ratio = row["retnet_tokens_per_s"] / row["transformer_tokens_per_s"]
        row["retnet_over_transformer"] = round(ratio, 3)
        rows.append(row)
        print(f"T={t:>6}: retnet {row['retnet_tokens_per_s']:9.1f} tok/s  transformer "
              f"{row['transformer_tokens_per_s']:9.1f} tok/s  ratio {row['retnet_over_transformer']:.2f}",
              file=sys.stderr, flush=True)
    pairs = {f"speedup_T{r['T']}": r["retnet_over_transformer"] for r in rows}
    pairs.update({f"retnet_tok_s_T{r['T']}": r["retnet_tokens_per_s"] for r in rows})
    pairs.update({f"transformer_tok_s_T{r['T']}": r["transformer_tokens_per_s"] for r in rows})
    pairs["param_ratio"] = params["retnet"] / params["transformer"]
    plot = save_plot(Path(args.plot), [
        {"title": "forward+backward throughput", "xlabel": "T (tokens)", "ylabel": "tokens/s", "logy": False,
         "series": {n: ([r["T"] for r in rows], [r[f"{n}_tokens_per_s"] for r in rows]) for n in models}},
    ], f"training throughput, CPU fp32, hidden {d}, {args.layers} layers, batch 1")
    result = {"bench": "train_throughput", "config": vars(args), "parameters": params, "table": rows,
              "plot": plot, "summary": pairs}
    emit("train_throughput", result, pairs)
    return result


if __name__ == "__main__":
    main()
