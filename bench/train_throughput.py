"""Training throughput (forward+backward tokens/s): RetNet vs the Transformer baseline at
equal parameters (RetNet: FFN 2d, value/gate 2d; Transformer: FFN 4d; both ~12 d^2 per layer).

    python bench/train_throughput.py [--quick] [--hidden 256 --layers 2 --heads 4 --lengths 2048 8192]
    python bench/train_throughput.py --device cuda --dtype bf16 --hidden 2048 --layers 4 --heads 8 \\
        --transformer-heads 16 --vocab 32000 --tokens-per-step 16384     # the 1.3B widths, 4 layers

Default: batch 1, fp32, CPU. No optimizer step (the optimizer costs the same for equal parameters).
RetNet trains with its chunkwise form (model.chunk_size; `--retention-kernel` picks the kernel where
the config has model.retention_kernel); the Transformer with SDPA's causal kernel (flash attention on
a GPU in bf16). The two models alternate step by step at each length (interleaved, so both see the
same machine load); the fastest step gives tokens/s (the median is in the table too). The tokens
are made before the timed steps; on a GPU each step is timed with CUDA events after `--warmup`
untimed steps (bench/device.py).

MFU: tokens/s x the arch spec's training FLOPs per token (megaret/models/spec.py flops_per_token,
3 x forward) / the card's bf16 dense peak (megaret/train/metrics.py card_peak; --peak-tflops
overrides). Both the rule and the peak are printed and kept in the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import add_out_arg, emit, median, out_path, save_plot  # noqa: E402


def arguments(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    from bench.device import add_device_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="hidden 64, T in 512 and 2048")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--transformer-heads", type=int, default=None, help="default: --heads")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--lengths", type=int, nargs="*", default=[2048, 8192])
    ap.add_argument("--tokens-per-step", type=int, default=0,
                    help="batch = max(1, this // T) sequences per step (0: batch 1)")
    ap.add_argument("--retention-kernel", default=None,
                    help="model.retention_kernel of the RetNet (auto | torch | fla), where the config has it")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="per-device peak for MFU (default: the card's)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    ap.add_argument("--plot", default=None, help="PNG, or 'none' (default: bench/out/, quick/ if --quick)")
    add_device_args(ap)
    add_out_arg(ap)
    args = ap.parse_args(argv)
    args.plot = args.plot or out_path(args.quick, "train_throughput.png", args.out)
    if args.quick:
        args.hidden, args.vocab, args.lengths, args.reps = 64, 512, [512, 2048], 2
    return ap, args


def model_configs(args: argparse.Namespace) -> dict:
    """The two ModelConfigs at equal parameters (see the module docstring)."""
    from megaret.config import ModelConfig

    d = args.hidden
    common = dict(vocab_size=args.vocab, hidden_size=d, num_layers=args.layers, dropout=0.0)
    retnet = dict(arch="retnet", num_heads=args.heads, ffn_hidden_size=2 * d, chunk_size=args.chunk, **common)
    if args.retention_kernel is not None:
        if "retention_kernel" not in {f.name for f in dataclasses.fields(ModelConfig)}:
            raise SystemExit(f"--retention-kernel {args.retention_kernel}: unavailable (this checkout has no "
                             "model.retention_kernel)")
        retnet["retention_kernel"] = args.retention_kernel
    return {"retnet": ModelConfig(**retnet),
            "transformer": ModelConfig(arch="transformer", num_heads=args.transformer_heads or args.heads,
                                       ffn_hidden_size=4 * d, **common)}


def main(argv: list[str] | None = None) -> dict:
    ap, args = arguments(argv)
    import torch

    from bench.device import Clock, describe, resolve

    device, dtype = resolve(ap, args)
    torch.set_num_threads(args.threads)
    from megaret.config import ParallelConfig
    from megaret.models.spec import arch_spec, build_model
    from megaret.parallel.context import build_parallel_context
    from megaret.parallel.megatron_config import megatron_config
    from megaret.train.metrics import DevicePeak, card_peak, mfu_rule

    ctx = build_parallel_context(1, 1, seed=0)
    cfgs = model_configs(args)
    models = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        models[name] = build_model(cfg, megatron_config(cfg, ParallelConfig()), ctx.tp).to(device, dtype)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    print(f"parameters: retnet {params['retnet']:,}  transformer {params['transformer']:,}", file=sys.stderr)
    peak = DevicePeak("given", args.peak_tflops, "--peak-tflops") if args.peak_tflops else None
    if peak is None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        peak = card_peak(props.name, props.total_memory)
    rules = {n: mfu_rule(cfgs[n], max(args.lengths), peak) for n in models}
    for name, rule in rules.items():
        print(f"{name}: {rule}", file=sys.stderr)
    clock = Clock(device)

    def train_step(name: str, x: torch.Tensor) -> None:
        m = models[name]
        m.zero_grad(set_to_none=True)
        m(x, torch.roll(x, -1, 1)).loss.mean().backward()

    rows = []
    for t in args.lengths:
        b = max(1, args.tokens_per_step // t)
        x = torch.randint(args.vocab, (b, t), device=device)  # made before any timed step
        for name in models:
            for _ in range(args.warmup):
                train_step(name, x)
        times = {n: [] for n in models}
        for rep in range(args.reps):
            for name in (list(models) if rep % 2 else list(models)[::-1]):
                times[name].append(clock.time(lambda name=name, x=x: train_step(name, x)))
        row = {"T": t, "batch": b}
        for name in models:
            tok_s = b * t / min(times[name])
            flops = arch_spec(cfgs[name].arch).flops_per_token(cfgs[name], t).training
            row[f"{name}_tokens_per_s"] = round(tok_s, 1)
            row[f"{name}_median_tokens_per_s"] = round(b * t / median(times[name]), 1)
            row[f"{name}_tflops"] = round(tok_s * flops / 1e12, 3)
            if peak is not None:
                row[f"{name}_mfu"] = round(tok_s * flops / (peak.tflops * 1e12), 4)
        ratio = row["retnet_tokens_per_s"] / row["transformer_tokens_per_s"]
        row["retnet_over_transformer"] = round(ratio, 3)
        rows.append(row)
        mfu = f"  MFU retnet {row['retnet_mfu']:.1%} transformer {row['transformer_mfu']:.1%}" if peak else ""
        print(f"T={t:>6} B={b}: retnet {row['retnet_tokens_per_s']:11.1f} tok/s  transformer "
              f"{row['transformer_tokens_per_s']:11.1f} tok/s  ratio {ratio:.2f}{mfu}",
              file=sys.stderr, flush=True)
    pairs = {f"speedup_T{r['T']}": r["retnet_over_transformer"] for r in rows}
    pairs.update({f"retnet_tok_s_T{r['T']}": r["retnet_tokens_per_s"] for r in rows})
    pairs.update({f"transformer_tok_s_T{r['T']}": r["transformer_tokens_per_s"] for r in rows})
    if peak is not None:
        pairs.update({f"retnet_mfu_T{r['T']}": r["retnet_mfu"] for r in rows})
        pairs.update({f"transformer_mfu_T{r['T']}": r["transformer_mfu"] for r in rows})
        pairs["peak_tflops"] = peak.tflops
    pairs["param_ratio"] = params["retnet"] / params["transformer"]
    plot = None
    if args.plot != "none":
        series = {n: ([r["T"] for r in rows], [r[f"{n}_tokens_per_s"] for r in rows]) for n in models}
        title = (f"training throughput, {describe(device)} {args.dtype}, hidden {args.hidden}, "
                 f"{args.layers} layers")
        plot = save_plot(Path(args.plot), [{"title": "forward+backward throughput", "xlabel": "T (tokens)",
                                            "ylabel": "tokens/s", "logy": False, "series": series}], title)
    result = {"bench": "train_throughput", "config": vars(args), "device": describe(device),
              "parameters": params, "peak": None if peak is None else dataclasses.asdict(peak),
              "mfu_rule": rules, "table": rows, "plot": plot, "summary": pairs}
    emit("train_throughput", result, pairs)
    return result


if __name__ == "__main__":
    main()
