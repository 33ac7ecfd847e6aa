"""Forward+backward time and peak memory of the retention forms against sequence length.

    python bench/retention_forms.py [--quick] [--heads 4 --head-dim 32 --chunk 256 --max-gb 10]
    python bench/retention_forms.py --device cuda --dtype bf16 --heads 4 --head-dim 256

parallel_retention (O(T^2) memory: the (B, H, T, T) score and decay matrices) from 512 up to
8192, chunk_retention (O(T C)) from 512 to 32768, on a tiny width on CPU (fp32, batch 1).

How memory is measured: every (form, T) point runs in a fresh subprocess. The child imports
torch, builds its inputs, runs the same form once at T=64 (so allocator and thread pools
exist), records ru_maxrss (the resident high-water mark), runs forward+backward at T, and
reports ru_maxrss(after) - ru_maxrss(before): the extra resident memory the point needed at
its peak. The child caps its address space (RLIMIT_AS) at its size before the run plus
--max-gb, so a point that needs more fails inside the child with an allocation error and is
reported as out of memory instead of taking the machine down.

Time: the fastest of the child's timed repetitions after that first run (on a shared
machine the minimum estimates the form's own cost; the median is reported too).

On a GPU (`--device cuda`, `--dtype bf16|fp32`) the points run in this process: inputs made
first, `--warmup` untimed runs, then each run timed with CUDA events (bench/device.py); memory is
the allocator's peak during the run above what it held before (torch.cuda.max_memory_allocated),
and a point past the card's memory is reported as out of memory. Points of the two
forms run interleaved (for each T: parallel, chunk, alternating which goes first), so both
see the same machine load; the goal ratios compare adjacent measurements.
Goal: at T=8192 the chunkwise form is >= 8x faster and needs <= 1/8 of the memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import add_out_arg, emit, median, out_path, save_plot  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[8]))
from megaret.ops import chunk_retention, parallel_retention, retnet_log_decay
form, T, H, D, C, max_gb, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
fn = parallel_retention if form == "parallel" else (lambda *a: chunk_retention(*a, chunk_size=C))
log_decay = retnet_log_decay(H)
def inputs(t):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, t, H, D, generator=g).requires_grad_() for _ in range(3)]
def run(t, xs):
    o, s = fn(*xs, log_decay)
    (o.square().mean() + s.square().mean()).backward()
run(64, inputs(64))
xs = inputs(T)
def vm_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
limit = vm_bytes() + int(max_gb * 2**30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
try:
    t0 = time.perf_counter(); run(T, xs); first = time.perf_counter() - t0
except (RuntimeError, MemoryError) as exc:
    print(json.dumps({"oom": True, "error": str(exc).splitlines()[0][:160]})); sys.exit(0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
times = [first]
for _ in range(reps - 1):
    for x in xs: x.grad = None
    t0 = time.perf_counter(); run(T, xs); times.append(time.perf_counter() - t0)
print(json.dumps({"oom": False, "peak_bytes": peak, "times": times}))
"""


def measure(form: str, t: int, args: argparse.Namespace, reps: int) -> dict:
    cmd = [sys.executable, "-c", CHILD, form, str(t), str(args.heads), str(args.head_dim), str(args.chunk),
           str(args.max_gb), str(reps), str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        if proc.returncode in (-9, 137):  # the kernel's OOM killer
            return {"oom": True, "error": f"child killed ({proc.returncode})"}
        raise RuntimeError(f"{form} T={t}: child exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    out = json.loads(lines[-1])
    if not out["oom"]:
        out["time_s"] = min(out["times"][1:] or out["times"])
        out["median_s"] = median(out["times"][1:] or out["times"])
    return out


def measure_cuda(form: str, t: int, args: argparse.Namespace, reps: int, dtype) -> dict:  # noqa: ANN001
    """One (form, T) point on the GPU, in this process (see the module docstring)."""
    import torch

    from bench.device import Clock
    from megaret.ops import chunk_retention, parallel_retention, retnet_log_decay

    fn = parallel_retention if form == "parallel" else (lambda *a: chunk_retention(*a, chunk_size=args.chunk))
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, t, args.heads, args.head_dim)
    xs = [torch.randn(shape, device="cuda", dtype=dtype, generator=g).requires_grad_() for _ in range(3)]
    log_decay = retnet_log_decay(args.heads).cuda()

    def run() -> None:
        for x in xs:
            x.grad = None
        o, s = fn(*xs, log_decay)
        (o.float().square().mean() + s.square().mean()).backward()

    try:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = Clock(torch.device("cuda")).times(run, reps, args.warmup)
        peak = torch.cuda.max_memory_allocated() - before
    except torch.cuda.OutOfMemoryError as exc:
        return {"oom": True, "error": str(exc).splitlines()[0][:160]}
    finally:
        xs.clear()
        torch.cuda.empty_cache()
    return {"oom": False, "peak_bytes": peak, "times": times, "time_s": min(times), "median_s": median(times)}


def main(argv: list[str] | None = None) -> dict:
    from bench.device import add_device_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T in 512 and 2048, CI-fast")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--max-gb", type=float, default=10.0, help="address-space budget per point")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    ap.add_argument("--plot", default=None, help="PNG, or 'none' (default: bench/out/, quick/ if --quick)")
    add_device_args(ap)
    add_out_arg(ap)
    args = ap.parse_args(argv)
    args.plot = args.plot or out_path(args.quick, "retention_forms.png", args.out)
    dtype = None
    if args.device == "cuda" or args.dtype != "fp32":
        from bench.device import resolve

        _, dtype = resolve(ap, args)
        if args.device == "cpu":
            ap.error("--dtype bf16 is measured on --device cuda only (the CPU points run fp32 children)")
    if args.quick:
        par_ts, chunk_ts, reps = [512, 2048], [512, 2048], args.reps or 2
    else:
        par_ts, chunk_ts, reps = [512, 1024, 2048, 4096, 8192], [512, 1024, 2048, 4096, 8192, 16384, 32768], \
            args.reps or 3
    points: dict[str, dict[int, dict]] = {"parallel": {}, "chunk": {}}
    parallel_dead = False
    for i, t in enumerate(sorted(set(par_ts) | set(chunk_ts))):
        order = ["parallel", "chunk"] if i % 2 == 0 else ["chunk", "parallel"]
        for form in order:
            if form == "parallel" and (t not in par_ts or parallel_dead):
                continue
            if form == "chunk" and t not in chunk_ts:
                continue
            if args.device == "cuda":
                r = measure_cuda(form, t, args, reps, dtype)
            else:
                r = measure(form, t, args, reps)
            points[form][t] = r
            if form == "parallel" and r["oom"]:
                parallel_dead = True  # longer sequences need more still
            state = "out of memory" if r["oom"] else \
                f"{r['time_s'] * 1e3:9.1f} ms  {r['peak_bytes'] / 2**20:9.1f} MiB"
            print(f"{form:>8} T={t:>6}: {state}", file=sys.stderr, flush=True)
    common = [t for t in par_ts if t in chunk_ts and not points["parallel"].get(t, {"oom": True})["oom"]]
    goal_t = 8192 if 8192 in common else (common[-1] if common else None)
    table = []
    for t in sorted(set(par_ts) | set(chunk_ts)):
        row = {"T": t}
        for form in ("parallel", "chunk"):
            r = points[form].get(t)
            row[f"{form}_ms"] = None if r is None or r["oom"] else round(r["time_s"] * 1e3, 2)
            row[f"{form}_mib"] = None if r is None or r["oom"] else round(r["peak_bytes"] / 2**20, 1)
            if r is not None and r["oom"]:
                row[f"{form}_ms"] = row[f"{form}_mib"] = "out of memory"
        table.append(row)
    pairs: dict = {}
    if goal_t is not None:
        p, c = points["parallel"][goal_t], points["chunk"][goal_t]
        speedup = p["time_s"] / c["time_s"]
        mem = c["peak_bytes"] / max(p["peak_bytes"], 1)
        pairs = {"T": goal_t, "speedup": speedup, "memory_ratio": mem,
                 "goal_speed_8x": "pass" if speedup >= 8 else "FAIL",
                 "goal_memory_1_8": "pass" if mem <= 1 / 8 else "FAIL"}
        if goal_t != 8192:
            pairs["note"] = "goal_is_defined_at_8192"
    longest = max((t for t, r in points["chunk"].items() if not r["oom"]), default=None)
    pairs["chunk_max_T"] = longest

    def series(form: str, key: str, scale: float) -> tuple[list, list]:
        ts = sorted(points[form])
        return ts, [None if points[form][t]["oom"] else points[form][t][key] * scale for t in ts]

    where = "CPU fp32" if args.device == "cpu" else f"{args.device} {args.dtype}"
    plot = None if args.plot == "none" else save_plot(Path(args.plot), [
        {"title": "forward+backward time", "xlabel": "T (tokens)", "ylabel": "ms",
         "series": {f: series(f, "time_s", 1e3) for f in ("parallel", "chunk")}},
        {"title": "peak extra resident memory", "xlabel": "T (tokens)", "ylabel": "MiB",
         "series": {f: series(f, "peak_bytes", 2**-20) for f in ("parallel", "chunk")}},
    ], f"retention forms, {where}, B=1 H={args.heads} D={args.head_dim} chunk={args.chunk}")
    result = {"bench": "retention_forms", "config": vars(args), "table": table, "plot": plot,
              "summary": pairs}
    emit("retention_forms", result, pairs)
    return result


if __name__ == "__main__":
    main()
