"""Per-token decoding latency and memory against context length: RetNet's recurrent form vs
the Transformer's KV cache, same width and depth, equal parameters (RetNet FFN 2d, Transformer 4d).

    python bench/decoding.py [--quick] [--hidden 1024 --layers 4 --heads 8 --vocab 32000]
    python bench/decoding.py --device cuda --dtype bf16 --hidden 2048 --layers 4 --heads 8 \
        --transformer-heads 16 --lengths 1024 16384      # the 1.3B widths, 4 layers, on a GPU

For each batch size (1, 8) and context length L (1k .. 16k) the carried state is filled
synthetically at length L (random RetNetState matrices; random KV caches of L keys in
buffers of capacity L + HEADROOM) instead of by a slow prefill, then one-token steps are
timed from it, the decoders interleaved (alternating which goes first) so all see the same
load. The Transformer's steps advance its cache (L, L + 1, ...: what decoding does; the
in-place append needs the cache at its buffer's frontier).
Latency is the minimum over the repetitions (the median is in the table too): on a shared
machine the minimum estimates a step's own cost, the median mostly the other tenants'.
On a GPU (`--device cuda`, `--dtype bf16`) each step is timed with CUDA events after `--warmup`
untimed steps (bench/device.py); the RetNet state stays fp32 (the retention ops carry it so), the
KV cache is in the model's dtype, and memory growth is the allocator's (torch.cuda.memory_allocated).

Memory: the bytes each decoder holds (weights + state / KV cache, exact tensor sizes) and the
measured growth of resident memory when its state was created (/proc/self/statm; on a GPU the
allocated device memory).
Bytes read per token (the bound for memory-bound decoding): all weights but the embedding
table (B rows of it), plus the whole KV cache (Transformer) or the retention states (RetNet).
Beside each measured latency ratio the bytes ratio is printed.

Goals: RetNet latency and memory flat (<= 1.1x from the shortest to the longest length);
at the longest length the Transformer/RetNet latency ratio is >= 70% of the bytes ratio.
Two Transformer decoders are timed: `transformer`, the model's own forward with its KVCache
(preallocated: the new key/value is written in place at the buffer's frontier and the
attention reads the L + 1 keys as a view, no copy), and `transformer_prealloc`, a
hand-written loop over the same layers and weights doing the same over the same buffers
(a reference: its logits are checked against the model's, and its time shows what the
model's forward adds around the arithmetic). The goal is checked against both.

Roofline (the summary line, per batch size at the longest length): the same run also times
the weight GEMMs alone (one F.linear per weight matrix but the embedding, input (B, in)) of
each model, and the Transformer's attention alone (SDPA of one query per sample over each
layer's cache). weight GB/s and GFLOP/s are what those GEMMs achieve; `gemm_growth` is a
batch's GEMM time over batch 1's: ~1 means the GEMMs stream the weights (bytes-bound), ~B
means they are compute-bound, where the bytes model (and the bytes ratio) stops predicting
latency. `overhead_ms` = RetNet's step minus its GEMMs (norms, the state update, framework
time per op: the same order for both models), and `time_model_ratio` = (RetNet step - RetNet
GEMMs + Transformer GEMMs + attention) / RetNet step predicts the latency ratio from these
measured parts instead of from bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import add_out_arg, emit, median, out_path, save_plot  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def nbytes(tensors) -> int:  # noqa: ANN001
    return sum(t.numel() * t.element_size() for t in tensors)


HEADROOM = 64  # free cache slots beyond L: the Transformer's timed steps append into them


def best_ms(clock, fn, reps: int, warmup: int = 1) -> float:  # noqa: ANN001
    """The minimum time of fn() over reps calls after `warmup` untimed ones, in ms (bench/device.py)."""
    return min(clock.times(fn, reps, warmup)) * 1e3


def main(argv: list[str] | None = None) -> dict:
    from bench.device import add_device_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, L in 1k and 4k")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--transformer-heads", type=int, default=None, help="default: --heads")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--reps", type=int, default=7, help=f"timed steps per decoder (< {HEADROOM - 2})")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    ap.add_argument("--plot", default=None, help="PNG, or 'none' (default: bench/out/, quick/ if --quick)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="also time RetNet's step replayed from a CUDA graph (retnet_graph; CUDA only)")
    add_device_args(ap)
    add_out_arg(ap)
    args = ap.parse_args(argv)
    args.plot = args.plot or out_path(args.quick, "decoding.png", args.out)
    if args.quick:
        args.hidden, args.layers, args.heads, args.vocab = 256, 2, 4, 2048
        args.lengths, args.reps = [1024, 4096], 3
    if args.reps + args.warmup > HEADROOM - 2:
        ap.error(f"--reps + --warmup must stay below {HEADROOM - 2}: the cache has {HEADROOM} free slots")

    import torch
    import torch.nn.functional as F

    from bench.device import Clock, describe, resolve

    device, dtype = resolve(ap, args)
    clock = Clock(device)
    torch.set_num_threads(args.threads)
    from megaret.config import ModelConfig, ParallelConfig
    from megaret.models.attention_layer import KVCache
    from megaret.models.retnet import RetNetState
    from megaret.models.spec import build_model
    from megaret.models.transformer import TransformerState
    from megaret.parallel.context import build_parallel_context
    from megaret.parallel.megatron_config import megatron_config

    ctx = build_parallel_context(1, 1, seed=0)
    d, nl, nh = args.hidden, args.layers, args.transformer_heads or args.heads  # nh: the Transformer's
    common = dict(vocab_size=args.vocab, hidden_size=d, num_layers=nl, dropout=0.0)
    cfgs = {"retnet": ModelConfig(arch="retnet", num_heads=args.heads, ffn_hidden_size=2 * d, **common),
            "transformer": ModelConfig(arch="transformer", num_heads=nh, ffn_hidden_size=4 * d, **common)}
    models = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        model = build_model(cfg, megatron_config(cfg, ParallelConfig()), ctx.tp)
        models[name] = model.to(device, dtype).eval()
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    weight_bytes = {n: nbytes(m.parameters()) for n, m in models.items()}
    embed_bytes = {n: nbytes([m.embedding.weight]) for n, m in models.items()}
    ret = models["retnet"].layers[0].retention
    hd = d // nh
    print(f"parameters: retnet {params['retnet']:,}  transformer {params['transformer']:,}", file=sys.stderr)

    def make_state(name: str, b: int, length: int):
        g = torch.Generator(device=device).manual_seed(length)
        if name == "retnet":  # fp32: the retention ops carry the state in fp32 whatever the dtype
            shape = (b, ret.local_heads, ret.key_dim, ret.value_dim)
            return RetNetState([torch.randn(shape, generator=g, device=device) * 0.02 for _ in range(nl)],
                               length)
        kv = (b, nh, length + HEADROOM, hd)  # L random keys/values, then free slots for the steps

        def randn() -> torch.Tensor:
            return torch.randn(kv, generator=g, device=device, dtype=dtype)

        bufs = [(randn(), randn()) for _ in range(nl)]
        caches = [KVCache.from_buffers(k, v, None, length) for k, v in bufs]  # takes the buffers over
        return TransformerState(caches, length)

    def state_tensors(state) -> list:  # noqa: ANN001
        if isinstance(state, RetNetState):
            return list(state.layers)
        return [t for c in state.layers for t in (c.k, c.v)]

    @torch.no_grad()
    def prealloc_step(state, tok):  # noqa: ANN001
        """Reference: one token through the Transformer's layers by hand, written into the slot
        at the frontier of the model's cache buffers (beyond every live entry: the model's next
        step overwrites it) and attending to the length + 1 keys as a view of the buffer."""
        m, length = models["transformer"], state.position
        x = m.embedding(tok.t().contiguous())  # (1, B, d)
        for layer, cache in zip(m.layers, state.layers, strict=True):
            a, buf = layer.attention, cache.buffer
            assert buf.length == cache.length == length
            q, k, v, scale = a.qkv(layer.attention_norm(x), length)  # (B, H, 1, D), rotated
            buf.k[:, :, length] = k[:, :, 0]
            buf.v[:, :, length] = v[:, :, 0]
            kb, vb = buf.k[:, :, :length + 1], buf.v[:, :, :length + 1]
            o = F.scaled_dot_product_attention(q, kb, vb, scale=scale)  # (B, H, 1, D): sees all L + 1
            x = x + a.out_proj(a.merge(o))[0]
            x = x + layer.ffn(layer.ffn_norm(x))
        return m.output(m.final_norm(x))[0].transpose(0, 1)  # (B, 1, V)

    states: dict = {}  # the decoders' current states (per batch size and length)
    graphs: dict = {}  # RetNet's step captured as a CUDA graph from states["retnet"] (--cuda-graph)

    @torch.no_grad()
    def step(name: str, tok) -> torch.Tensor:
        """One decoding step of `name` from states[name]; the Transformer's state advances."""
        if name == "retnet":
            return models[name](tok, state=states[name], retention_mode="recurrent").logits
        if name == "retnet_graph":  # its own copy of the state advances; the timing is the same
            return graphs["retnet"](tok)
        if name == "transformer":
            out = models[name](tok, state=states[name])
            states[name] = out.state
            return out.logits
        return prealloc_step(states["transformer"], tok)

    weights = {n: [p for name, p in m.named_parameters() if p.dim() == 2 and not name.startswith("embedding")]
               for n, m in models.items()}

    @torch.no_grad()
    def gemms(name: str, b: int) -> float:
        """ms for the weight GEMMs alone of one decoding step of `name` at batch b."""
        xs = {w.shape[1]: torch.randn(b, w.shape[1], device=device, dtype=dtype) for w in weights[name]}
        return best_ms(clock, lambda: [F.linear(xs[w.shape[1]], w) for w in weights[name]], args.reps,
                       args.warmup)

    @torch.no_grad()
    def attention_ms(state, b: int) -> float:  # noqa: ANN001
        """ms for the Transformer's attention alone: one query per sample over each layer's cache."""
        q = torch.randn(b, nh, 1, hd, device=device, dtype=dtype)
        return best_ms(clock, lambda: [F.scaled_dot_product_attention(q, c.k, c.v) for c in state.layers],
                       args.reps, args.warmup)

    def held_bytes() -> int:
        return torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()

    embed_row_bytes = torch.finfo(dtype).bits // 8  # per element of the B embedding rows read
    deciders = ["retnet", "transformer", "transformer_prealloc"]
    if args.cuda_graph:
        if device.type != "cuda":
            ap.error("--cuda-graph needs --device cuda")
        from megaret.infer.cuda_graph import GraphedStep

        deciders.append("retnet_graph")
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2  # the prealloc loop vs the model's forward
    rows, roof = [], {}
    for b in args.batches:
        tok = torch.randint(args.vocab, (b, 1), device=device)
        for length in args.lengths:
            states.clear()
            grown = {}
            for name in models:
                r0 = held_bytes()
                states[name] = make_state(name, b, length)
                grown[name] = held_bytes() - r0
            sizes = {n: nbytes(state_tensors(states[n])) for n in models}  # at length L
            p = step("transformer_prealloc", tok)  # writes the frontier slot L, reads L + 1 keys
            a = step("transformer", tok)  # writes the same slot (same key/value), advances to L + 1
            prealloc_err = ((a - p).abs().max() / a.abs().max()).item()
            if prealloc_err > tolerance:
                raise AssertionError(f"the prealloc step disagrees with the model: {prealloc_err:.2e}")
            if args.cuda_graph:
                graphs["retnet"] = GraphedStep(models["retnet"], states["retnet"], "recurrent")
                e, g1 = step("retnet", tok), step("retnet_graph", tok)  # the same state: the same logits
                row_graph_err = ((g1 - e).abs().max() / e.abs().max()).item()
                if row_graph_err > tolerance:
                    raise AssertionError(f"the graphed RetNet step disagrees: {row_graph_err:.2e}")
            if length == max(args.lengths):  # the roofline parts, under the same load as the steps
                roof[b] = {"gemm_ms": {n: gemms(n, b) for n in models}, "kv_bytes": sizes["transformer"],
                           "attention_ms": attention_ms(states["transformer"], b)}
            times = {n: [] for n in deciders}
            for rep in range(args.reps + args.warmup):  # the first rounds warm up
                for name in (deciders if rep % 2 else deciders[::-1]):
                    dt = clock.time(lambda name=name, tok=tok: step(name, tok))
                    if rep >= args.warmup:
                        times[name].append(dt)
            if states["transformer"].layers[0].buffer.capacity != length + HEADROOM:
                raise AssertionError("the Transformer's cache was reallocated while timing")
            row = {"batch": b, "length": length, "prealloc_logits_rel_err": prealloc_err}
            if args.cuda_graph:
                row["graph_logits_rel_err"] = row_graph_err
                row["latency_ratio_graph"] = round(min(times["transformer"]) / min(times["retnet_graph"]), 3)
            read = {}
            for name in deciders:
                row[f"{name}_ms"] = round(min(times[name]) * 1e3, 3)
                row[f"{name}_median_ms"] = round(median(times[name]) * 1e3, 3)
            for name in models:
                sb = sizes[name]
                read[name] = weight_bytes[name] - embed_bytes[name] + b * d * embed_row_bytes + sb
                row[f"{name}_state_mib"] = round(sb / 2**20, 2)
                row[f"{name}_held_mib"] = round((weight_bytes[name] + sb) / 2**20, 1)
                row[f"{name}_rss_growth_mib"] = round(grown[name] / 2**20, 1)
                row[f"{name}_read_mib"] = round(read[name] / 2**20, 1)
            row["transformer_buffer_mib"] = round(  # what the cache buffers hold: L + HEADROOM slots
                nbytes(t for c in states["transformer"].layers for t in (c.buffer.k, c.buffer.v)) / 2**20, 2)
            row["bytes_ratio"] = round(read["transformer"] / read["retnet"], 3)
            for name, key in (("transformer", ""), ("transformer_prealloc", "_prealloc")):
                row[f"latency_ratio{key}"] = round(row[f"{name}_ms"] / row["retnet_ms"], 3)
                row[f"latency_over_bytes{key}"] = round(row[f"latency_ratio{key}"] / row["bytes_ratio"], 3)
            rows.append(row)
            print(f"B={b} L={length:>6}: retnet {row['retnet_ms']:8.2f} ms  "
                  f"transformer {row['transformer_ms']:9.2f} ms "
                  f"(prealloc {row['transformer_prealloc_ms']:9.2f})"
                  f"  latency ratio {row['latency_ratio']:6.2f} ({row['latency_ratio_prealloc']:6.2f})"
                  f"  bytes ratio {row['bytes_ratio']:6.2f}"
                  + (f"  | retnet graph {row['retnet_graph_ms']:8.2f} ms, transformer/graph "
                     f"{row['latency_ratio_graph']:6.2f}" if args.cuda_graph else ""),
                  file=sys.stderr, flush=True)
            states.clear()
            graphs.clear()

    lo, hi = min(args.lengths), max(args.lengths)
    pairs: dict = {}
    for b in args.batches:
        r_lo = next(r for r in rows if r["batch"] == b and r["length"] == lo)
        r_hi = next(r for r in rows if r["batch"] == b and r["length"] == hi)
        pairs[f"b{b}_retnet_latency_growth"] = r_hi["retnet_ms"] / r_lo["retnet_ms"]
        pairs[f"b{b}_retnet_memory_growth"] = r_hi["retnet_held_mib"] / r_lo["retnet_held_mib"]
        pairs[f"b{b}_bytes_ratio_at_{hi}"] = r_hi["bytes_ratio"]
        pairs[f"b{b}_latency_ratio_at_{hi}"] = r_hi["latency_ratio"]
        pairs[f"b{b}_latency_ratio_prealloc_at_{hi}"] = r_hi["latency_ratio_prealloc"]
        pairs[f"b{b}_latency_over_bytes"] = r_hi["latency_over_bytes"]
        pairs[f"b{b}_latency_over_bytes_prealloc"] = r_hi["latency_over_bytes_prealloc"]
        if args.cuda_graph:
            pairs[f"b{b}_graph_ms_at_{hi}"] = r_hi["retnet_graph_ms"]
            pairs[f"b{b}_latency_ratio_graph_at_{hi}"] = r_hi["latency_ratio_graph"]
            pairs[f"b{b}_graph_speedup_at_{hi}"] = round(r_hi["retnet_ms"] / r_hi["retnet_graph_ms"], 3)
    b1 = min(args.batches)
    for b, r in roof.items():
        g, att = r["gemm_ms"], r["attention_ms"]
        pairs[f"b{b}_gemm_ms_retnet"] = g["retnet"]
        pairs[f"b{b}_gemm_ms_transformer"] = g["transformer"]
        pairs[f"b{b}_attention_ms"] = att
        # achieved rates of the Transformer's weight GEMMs (2 flops per weight per sample)
        n_w = sum(w.numel() for w in weights["transformer"])
        w_bytes = nbytes(weights["transformer"])
        pairs[f"b{b}_gemm_gbps"] = w_bytes / g["transformer"] / 1e6
        pairs[f"b{b}_gemm_gflops"] = 2 * b * n_w / g["transformer"] / 1e6
        pairs[f"b{b}_kv_gbps"] = r["kv_bytes"] / att / 1e6
        pairs[f"b{b}_gemm_growth"] = g["retnet"] / roof[b1]["gemm_ms"]["retnet"]  # vs the smallest batch
        step_ms = next(r["retnet_ms"] for r in rows if r["batch"] == b and r["length"] == hi)
        pairs[f"b{b}_overhead_ms"] = step_ms - g["retnet"]
        pairs[f"b{b}_time_model_ratio"] = (step_ms - g["retnet"] + g["transformer"] + att) / step_ms
        print(f"B={b} L={hi}: weight GEMMs retnet {g['retnet']:.2f} ms, transformer {g['transformer']:.2f} ms"
              f" ({pairs[f'b{b}_gemm_gbps']:.1f} GB/s, {pairs[f'b{b}_gemm_gflops']:.1f} GFLOP/s, "
              f"{pairs[f'b{b}_gemm_growth']:.2f}x batch {b1}'s time); attention {att:.2f} ms "
              f"({pairs[f'b{b}_kv_gbps']:.1f} GB/s of KV cache); RetNet step {step_ms:.2f} ms "
              f"({pairs[f'b{b}_overhead_ms']:.2f} ms outside GEMMs); time-model latency ratio "
              f"{pairs[f'b{b}_time_model_ratio']:.2f}", file=sys.stderr, flush=True)
    flat = all(pairs[f"b{b}_retnet_latency_growth"] <= 1.1 and pairs[f"b{b}_retnet_memory_growth"] <= 1.1
               for b in args.batches)
    pairs["goal_retnet_flat"] = "pass" if flat else "FAIL"
    for key in ("", "_prealloc"):
        pairs[f"goal_70pct_of_bytes_ratio{key}"] = "pass" if all(
            pairs[f"b{b}_latency_over_bytes{key}"] >= 0.7 for b in args.batches) else "FAIL"

    def series(key: str, names) -> dict:  # noqa: ANN001
        return {f"{m} B={b}": ([r["length"] for r in rows if r["batch"] == b],
                               [r[f"{m}_{key}"] for r in rows if r["batch"] == b])
                for b in args.batches for m in names}

    plot = None if args.plot == "none" else save_plot(Path(args.plot), [
        {"title": "per-token latency", "xlabel": "context length", "ylabel": "ms",
         "series": series("ms", deciders)},
        {"title": "memory held (weights + state/cache)", "xlabel": "context length", "ylabel": "MiB",
         "series": series("held_mib", models)},
    ], f"decoding, {describe(device)} {args.dtype}, hidden {d}, {nl} layers, {args.heads}/{nh} heads")
    result = {"bench": "decoding", "config": vars(args), "device": describe(device), "parameters": params,
              "table": rows, "plot": plot, "roofline": {str(b): r for b, r in roof.items()}, "summary": pairs}
    emit("decoding", result, pairs)
    return result


if __name__ == "__main__":
    main()
