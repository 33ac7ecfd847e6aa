"""Quality at equal parameters and equal tokens: RetNet vs the Transformer baseline vs the
Block-Recurrent Transformer (Rec:fixed:skip) vs a sliding-window Transformer.

    python bench/quality.py [--quick] [--seeds 1 2] [--steps 600] [--hidden 128 --layers 4] [--jobs 2]

Every model is trained by the trainer (`python -m megaret.train` subprocesses, `--jobs` at a
time, one torch thread each) on the embedded default corpus (data.source=shards), with the
same data config and seed, so for a given seed every model sees exactly the same tokens in
the same order (steps x global batch x sequence length, printed per model). Parameters are
matched to the Transformer (FFN 4d) by choosing each other arch's FFN width (RetNet: value
and gate 2d; BRT: one recurrent layer, fixed gate, state skip), within 2% (checked, printed).

Validation perplexity is exp(eval/loss) at the last step (the trainer's held-out batches,
the same ones for every model); the table gives the mean and the spread (min-max) over
seeds. Loss curves (train/loss and eval/loss, mean over seeds) are read from the TensorBoard
events each run writes under run.dir/tensorboard. An arch the trainer refuses is skipped
with its reason. Writes bench/out/quality.{json,png,md}; the last line is name=value pairs.

Full mode is sized for <= 60 minutes on 2 idle cores; --quick (CI) checks the pipeline only
(one seed, a few steps, tiny widths).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import add_out_arg, emit, median, out_path, save_plot  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARCHS = {  # name -> (base config, label)
    "retnet": ("configs/tiny.yaml", "RetNet"),
    "transformer": ("configs/transformer-tiny.yaml", "Transformer"),
    "brt": ("configs/brt-tiny.yaml", "BRT Rec:fixed:skip"),
    "sliding": ("configs/sliding-tiny.yaml", "Sliding-window Transformer"),
}
PARAM_TOLERANCE = 0.02


def model_overrides(arch: str, args: argparse.Namespace, ffn: int) -> list[str]:
    d, block = args.hidden, args.block
    o = [
        f"model.hidden_size={d}",
        f"model.num_layers={args.layers}",
        f"model.num_heads={args.heads}",
        f"model.ffn_hidden_size={ffn}",
        f"model.vocab_size={args.vocab}",
        "model.dropout=0.0",
    ]
    if arch == "retnet":
        o += ["model.value_factor=2", f"model.chunk_size={min(64, args.seq_length)}"]
    if arch in ("brt", "sliding"):
        o.append(f"model.block_size={block}")
    if arch == "brt":
        o += [
            f"model.recurrent_layers=[{args.layers // 2}]",
            "model.gate_type=fixed",
            "model.state_skip=true",
            "model.num_states=" + str(args.states),
        ]
    return o


def common_overrides(args: argparse.Namespace, seed: int, run_dir: Path) -> list[str]:
    evals = max(1, args.steps // args.evals)
    return [
        "data.source=shards", f"data.seq_length={args.seq_length}", "data.packing=packed",
        "data.num_workers=0", "data.default_corpus=small", f"train.steps={args.steps}", f"train.seed={seed}",
        f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}",
        "train.precision=fp32",
        f"train.log_interval={max(1, args.steps // 10)}", f"train.eval_interval={evals}",
        f"train.eval_steps={args.eval_steps}", f"optimizer.lr={args.lr}",
        f"optimizer.warmup_steps={max(1, args.steps // 20)}", f"checkpoint.interval={args.steps}",
        "checkpoint.keep_last=1", "checkpoint.resume=false", "parallel.tensor=1", "parallel.pipeline=1",
        f"run.dir={run_dir}",
    ]  # fmt: skip


def match_ffn(arch: str, args: argparse.Namespace, target: int) -> tuple[int, int]:
    """The FFN width (a multiple of 8) whose parameter count is closest to target, and that count."""
    from megaret.config import load_config
    from megaret.models.spec import param_count

    best = None
    for ffn in range(8, 16 * args.hidden + 1, 8):
        cfg = load_config(REPO / ARCHS[arch][0], model_overrides(arch, args, ffn))
        n = param_count(cfg.model)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (ffn, n)
    return best


def refusal(arch: str, overrides: list[str]) -> str | None:
    """Why the trainer would refuse this config (its own checks: Config.validate at load, the
    world-size checks), or None."""
    from megaret.config import ConfigError, load_config

    try:
        cfg = load_config(REPO / ARCHS[arch][0], overrides)
        cfg.validate_world(1)
    except ConfigError as exc:
        return str(exc)
    return None


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    last = {}
    for e in acc.Scalars(tag):  # a step logged twice keeps its last value
        last[e.step] = e.value
    return sorted(last.items())


def train(arch: str, seed: int, overrides: list[str], run_dir: Path, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "megaret.train", "--config", ARCHS[arch][0], *overrides]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        rc, err = -1, f"timed out after {timeout:.0f}s"
    secs = time.perf_counter() - t0
    res = {"arch": arch, "seed": seed, "seconds": secs, "run_dir": str(run_dir), "rc": rc}
    if rc != 0:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        res["error"] = lines[-1] if lines else f"exit {rc}"
        return res
    res["train_loss"] = scalars(run_dir, "train/loss")
    res["eval_loss"] = scalars(run_dir, "eval/loss")
    rates = [v for s, v in scalars(run_dir, "train/tokens_per_s") if s > 1]  # step 1 warms up
    res["tokens_per_s"] = median(rates) if rates else None
    if res["eval_loss"]:
        res["val_loss"] = res["eval_loss"][-1][1]
        res["val_ppl"] = math.exp(res["val_loss"])
    print(
        f"  {arch} seed {seed}: {secs:.0f}s, val loss {res.get('val_loss', float('nan')):.4f}",
        file=sys.stderr,
        flush=True,
    )
    return res


def mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves))) if curves else []
    per = [dict(c) for c in curves]
    return steps, [sum(p[s] for p in per) / len(per) for s in steps]


def binned(curve: tuple[list[int], list[float]], bins: int = 40) -> tuple[list[float], list[float]]:
    """A noisy per-step curve averaged over consecutive windows (about `bins` points), for the plot."""
    steps, values = curve
    w = max(1, len(steps) // bins)
    idx = range(0, len(steps) - w + 1, w)
    return [sum(steps[i : i + w]) / w for i in idx], [sum(values[i : i + w]) / w for i in idx]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="CI: one seed, 6 steps, hidden 32 (pipeline check only)"
    )
    ap.add_argument("--archs", nargs="*", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512, help="the default corpus's tokenizer is built for it")
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--block", type=int, default=64, help="BRT block / sliding window size")
    ap.add_argument("--states", type=int, default=16, help="BRT recurrent states")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (global batch)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--evals", type=int, default=10, help="evaluations per run")
    ap.add_argument("--eval-steps", type=int, default=8, help="held-out batches per evaluation")
    ap.add_argument("--jobs", type=int, default=2, help="training runs at a time (one torch thread each)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per training run at most")
    ap.add_argument("--runs", default=None, help="run directories go here")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--json", default=None)
    add_out_arg(ap)
    args = ap.parse_args(argv)
    args.runs = args.runs or out_path(args.quick, "quality_runs", args.out)
    args.plot = args.plot or out_path(args.quick, "quality.png", args.out)
    args.json = args.json or out_path(args.quick, "quality.json", args.out)
    if args.quick:
        args.seeds, args.steps, args.hidden, args.layers, args.heads = args.seeds[:1], 6, 32, 2, 2
        args.seq_length, args.block, args.states, args.batch, args.evals, args.eval_steps = 64, 16, 4, 2, 2, 1
        args.timeout = min(args.timeout, 150)
    if args.seq_length % args.block:
        ap.error(f"--seq-length {args.seq_length} must be a multiple of --block {args.block}")

    from megaret.config import load_config
    from megaret.models.spec import param_count

    d = args.hidden
    ref = param_count(
        load_config(REPO / ARCHS["transformer"][0], model_overrides("transformer", args, 4 * d)).model
    )
    plan, skipped = {}, {}
    for arch in args.archs:
        ffn, n = (4 * d, ref) if arch == "transformer" else match_ffn(arch, args, ref)
        plan[arch] = {
            "ffn_hidden_size": ffn,
            "params": n,
            "param_ratio": n / ref,
            "non_embedding_params": n - 2 * args.vocab * d,
        }
        if abs(n / ref - 1) > PARAM_TOLERANCE:
            skipped[arch] = f"parameters {n:,} not within {PARAM_TOLERANCE:.0%} of {ref:,}"
    tokens = args.steps * args.batch * args.seq_length
    print(
        f"equal parameters (reference Transformer {ref:,}); tokens per run {tokens:,} "
        f"({args.steps} steps x {args.batch} x {args.seq_length}), same data seed per seed",
        flush=True,
    )
    for arch, p in plan.items():
        print(
            f"  {arch:12s} ffn {p['ffn_hidden_size']:5d}  params {p['params']:>10,}  "
            f"ratio {p['param_ratio']:.4f}  tokens {tokens:,}",
            flush=True,
        )

    runs_root = Path(args.runs)
    jobs = []
    for arch in args.archs:
        if arch in skipped:
            continue
        for seed in args.seeds:
            run_dir = runs_root / f"{arch}-seed{seed}"
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)
            overrides = [
                *model_overrides(arch, args, plan[arch]["ffn_hidden_size"]),
                *common_overrides(args, seed, run_dir),
            ]
            why = refusal(arch, overrides)
            if why is not None:
                skipped[arch] = f"trainer refuses: {why}"
                break
            jobs.append((arch, seed, overrides, run_dir))
    for arch, why in skipped.items():
        print(f"skipping {arch}: {why}", flush=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda j: train(*j, timeout=args.timeout), jobs))
    wall = time.perf_counter() - t0

    rows, series_train, series_eval = [], {}, {}
    for arch in args.archs:
        mine = [r for r in results if r["arch"] == arch]
        failed = [r for r in mine if "val_ppl" not in r]
        if failed and arch not in skipped:
            skipped[arch] = "training failed: " + failed[0].get("error", "no eval/loss logged")
            print(f"skipping {arch}: {skipped[arch]}", flush=True)
        ok = [r for r in mine if "val_ppl" in r]
        if arch in skipped or not ok:
            continue
        ppl = [r["val_ppl"] for r in ok]
        mean = sum(ppl) / len(ppl)
        rows.append(
            {
                "arch": arch,
                "label": ARCHS[arch][1],
                **plan[arch],
                "tokens": tokens,
                "seeds": [r["seed"] for r in ok],
                "val_ppl": ppl,
                "val_ppl_mean": mean,
                "val_ppl_spread": max(ppl) - min(ppl),
                "val_loss_mean": sum(r["val_loss"] for r in ok) / len(ok),
                "train_seconds": [round(r["seconds"], 1) for r in ok],
                "tokens_per_s": [r["tokens_per_s"] and round(r["tokens_per_s"]) for r in ok],
            }
        )
        series_train[arch] = mean_curve([r["train_loss"] for r in ok])
        series_eval[arch] = mean_curve([r["eval_loss"] for r in ok])

    md = [
        "| model | params | ratio | tokens | val ppl mean | spread (max-min) | per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['label']} | {r['params']:,} | {r['param_ratio']:.3f} | {r['tokens']:,} | "
            f"{r['val_ppl_mean']:.2f} | {r['val_ppl_spread']:.2f} | "
            f"{', '.join(f'{p:.2f}' for p in r['val_ppl'])} |"
        )
    for arch, why in skipped.items():
        md.append(f"| {ARCHS[arch][1]} | {plan[arch]['params']:,} | - | - | skipped | - | {why[:80]} |")
    print("\n".join(md), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)

    panels = [
        {
            "title": "train/loss (mean over seeds, window-averaged)",
            "xlabel": "step",
            "ylabel": "loss",
            "logx": False,
            "logy": False,
            "series": {ARCHS[a][1]: binned(s) for a, s in series_train.items()},
        },
        {
            "title": "eval/loss (mean over seeds)",
            "xlabel": "step",
            "ylabel": "loss",
            "logx": False,
            "logy": False,
            "series": {ARCHS[a][1]: s for a, s in series_eval.items()},
        },
    ]
    plot = save_plot(
        Path(args.plot),
        panels,
        f"Quality at ~{ref / 1e6:.2f}M parameters, {tokens:,} tokens, {len(args.seeds)} seed(s)",
    )
    result = {
        "quick": args.quick, "reference_params": ref, "tokens_per_run": tokens, "seeds": args.seeds,
        "config": {k: getattr(args, k) for k in ("steps", "hidden", "layers", "heads", "vocab", "seq_length",
                                                  "block", "states", "batch", "lr", "eval_steps")},
        "table": rows, "skipped": skipped, "markdown": "\n".join(md), "plot": plot, "wall_seconds": wall,
        "curves": {a: {"train": series_train[a], "eval": series_eval[a]} for a in series_train},
    }  # fmt: skip
    Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    Path(args.json).with_suffix(".md").write_text("\n".join(md) + "\n", encoding="utf-8")
    pairs = {f"{r['arch']}_ppl": r["val_ppl_mean"] for r in rows}
    pairs.update({f"{r['arch']}_spread": r["val_ppl_spread"] for r in rows})
    ratios = [p["param_ratio"] for a, p in plan.items()]
    pairs.update(
        params=ref,
        max_param_dev=max(abs(x - 1) for x in ratios),
        tokens=tokens,
        trained=len(rows),
        skipped=",".join(skipped) or "none",
        wall_s=round(wall, 1),
    )
    emit("quality", {k: v for k, v in result.items() if k != "curves"}, pairs)
    return result


if __name__ == "__main__":
    main()
