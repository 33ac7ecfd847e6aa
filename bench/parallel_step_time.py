"""Optimizer-step time of the trainer under parallel layouts, tiny RetNet on CPU ranks (gloo).

    python bench/parallel_step_time.py [--quick] [--steps N]

One run measures, with the same model and global batch: TP=1 (one process) against TP=2, and on
two ranks PP=2 against PP=1 (= DP=2, ZeRO-1), ZeRO-1 against no ZeRO (ZeRO-0, DP=2), and sequence
parallelism on against off (TP=2). Each layout builds the real Trainer (DeepSpeed engine,
megatron schedule) and times train_step after one warm-up step; the median step time is
reported. Two launches (1 rank, 2 ranks); the 2-rank layouts run one after another in the same
processes. On a shared 2-core CPU with gloo the numbers are noisy and weigh communication
overhead against tiny compute; they compare layouts, they do not predict GPU scaling.
Prints JSON, then `bench=parallel_step_time name=value ...` as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import emit, median  # noqa: E402

TWO_RANK = {
    "tp2": ["parallel.tensor=2"],
    "tp2_sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline=2"],
    "dp2_zero1": ["parallel.zero_stage=1"],
    "dp2_zero0": ["parallel.zero_stage=0"],
}


def base(quick: bool, run_dir: str) -> list[str]:
    hidden, seq = (64, 64) if quick else (256, 256)
    return [f"model.hidden_size={hidden}", f"model.ffn_hidden_size={2 * hidden}", "model.num_layers=2",
            "model.num_heads=4", "model.vocab_size=512", "model.chunk_size=32", f"data.seq_length={seq}",
            "data.source=synthetic", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.precision=fp32", "train.eval_steps=0", "train.log_interval=1000000",
            "logging.tensorboard=false", "checkpoint.resume=false", "checkpoint.interval=1000000",
            f"run.dir={run_dir}"]


def worker(layouts: list[str], steps: int, quick: bool, run_dir: str) -> None:
    import torch.distributed as dist

    from megaret.config import load_config
    from megaret.train.trainer import Trainer

    out = {}
    for name in layouts:
        overrides = TWO_RANK.get(name, [])
        cfg = load_config("configs/tiny.yaml", [*base(quick, f"{run_dir}/{name}"), f"train.steps={steps + 1}",
                                                *overrides])
        trainer = Trainer(cfg)
        trainer.train_step()  # warm-up
        times = []
        for _ in range(steps):
            dist.barrier()
            t0 = time.perf_counter()
            trainer.train_step()
            dist.barrier()
            times.append(time.perf_counter() - t0)
        trainer.close()
        out[name] = {"median_s": median(times), "min_s": min(times), "times_s": times}
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def launch(nproc: int, layouts: list[str], steps: int, quick: bool, run_dir: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), __file__, "--worker", ",".join(layouts),
           "--steps", str(steps), "--run-dir", run_dir, *(["--quick"] if quick else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{nproc}-rank run failed ({proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="hidden 64, seq 64, 3 timed steps")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per layout (default 3 quick, 10)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    steps = args.steps or (3 if args.quick else 10)
    if args.worker:
        worker(args.worker.split(","), steps, args.quick, args.run_dir)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        times = launch(1, ["tp1"], steps, args.quick, tmp)
        times.update(launch(2, list(TWO_RANK), steps, args.quick, tmp))
    med = {k: v["median_s"] for k, v in times.items()}
    pairs = {
        "tp1_s": med["tp1"], "tp2_s": med["tp2"], "tp2_over_tp1": med["tp2"] / med["tp1"],
        "pp2_s": med["pp2"], "pp1_dp2_s": med["dp2_zero1"], "pp2_over_pp1": med["pp2"] / med["dp2_zero1"],
        "zero1_s": med["dp2_zero1"], "zero0_s": med["dp2_zero0"], "zero1_over_none": med["dp2_zero1"] /
        med["dp2_zero0"], "sp_s": med["tp2_sp"], "sp_over_nosp": med["tp2_sp"] / med["tp2"],
    }
    result = {"quick": args.quick, "timed_steps": steps, "layouts": times, "summary": pairs}
    emit("parallel_step_time", result, pairs)
    return result


if __name__ == "__main__":
    main()
