"""Launched by tests/test_reshard.py: resume checkpoints on another parallel layout.

    reshard.py source WORK    (2 ranks)
    reshard.py resume WORK    (1 rank)

`source` trains a tiny 4-layer RetNet (synthetic data, fp32, ZeRO-1) at each of three 2-rank
layouts, DP2, TP2 and PP2, and a bf16 one at PP2 (DeepSpeed's BF16_Optimizer, files
bf16_zero_pp_rank_*), in WORK/<layout>/run: 7 steps, saving at step 4 only. It stores the
full weights, fp32 masters and Adam moments gathered at step 4 (WORK/<layout>/step4.pt) and the
losses of steps 5..7 (the original layout continuing). Then it resumes each PP2 checkpoint at TP2
(a copy of its run dir) and trains steps 5..7. `resume` resumes each source checkpoint (a copy) in one
process (TP1 PP1 DP1), gathers the weights and moments right after loading and trains steps
5..7. Rank 0 prints one line `RESULT {json}`; tensors go to WORK/<layout>/<case>.pt.
"""

from __future__ import annotations

import gc
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _common import report_and_close  # tests/distributed/_common.py (the script's own folder)

from megaret.checkpoint.reshard import MOMENTS, full_optimizer_state
from megaret.config import load_config
from megaret.parallel.context import init_distributed
from megaret.train.trainer import Trainer

COMMON = [
    "model.num_layers=4", "model.chunk_size=16", "model.vocab_size=128", "data.seq_length=32",
    "data.source=synthetic", "train.precision=fp32", "parallel.zero_stage=1",
    "train.steps=10", "train.micro_batch_size=1", "train.global_batch_size=4", "train.log_interval=100",
    "train.eval_steps=0", "optimizer.warmup_steps=3", "optimizer.clip_grad=1.0", "logging.tensorboard=false",
    "checkpoint.interval=4", "checkpoint.keep_last=2",
]
# name -> (tensor, pipeline, precision) on 2 ranks
SOURCES = {"dp2": (1, 1, "fp32"), "tp2": (2, 1, "fp32"), "pp2": (1, 2, "fp32"), "pp2_bf16": (1, 2, "bf16")}
STEPS_AFTER = 3  # steps 5..7


def trainer_at(run_dir: Path, tp: int, pp: int, precision: str) -> Trainer:
    layout = [f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"run.dir={run_dir}",
              f"train.precision={precision}"]
    return Trainer(load_config("configs/tiny.yaml", [*COMMON, *layout]))


def snapshot(t: Trainer) -> dict:
    """Full weights, fp32 masters and Adam moments (collective)."""
    moments = {m: full_optimizer_state(t.engine, t.stages, t.ctx, m) for m in (*MOMENTS, "master")}
    return {"params": t.full_parameters(), **moments}


def finish(t: Trainer) -> None:
    t.close()
    del t
    gc.collect()


def copy_run(src: Path, dst: Path) -> None:
    if dist.get_rank() == 0:
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src / "checkpoints", dst / "checkpoints")
    dist.barrier()


def resumed(run_dir: Path, tp: int, pp: int, precision: str, save_to: Path) -> dict:
    t = trainer_at(run_dir, tp, pp, precision)
    out = {"resumed_from": t.resumed_from.name if t.resumed_from else None, "step": t.step,
           "messages": t.checkpointer.messages, "layout": [t.ctx.tp.size, t.ctx.pp_size, t.ctx.dp_size]}
    snap = snapshot(t)
    out["losses"] = [t.train_step().loss for _ in range(STEPS_AFTER)]
    finish(t)
    if dist.get_rank() == 0:
        torch.save(snap, save_to)
    return out


def source(work: Path) -> dict:
    report = {}
    for name, (tp, pp, precision) in SOURCES.items():
        t = trainer_at(work / name / "run", tp, pp, precision)
        losses = [t.train_step().loss for _ in range(4)]  # saves step 4
        snap = snapshot(t)
        losses += [t.train_step().loss for _ in range(STEPS_AFTER)]  # the original layout continuing
        report[name] = {"losses": losses, "layout": [t.ctx.tp.size, t.ctx.pp_size, t.ctx.dp_size],
                        "checkpoints": sorted(p.name for p in (work / name / "run/checkpoints").iterdir())}
        finish(t)
        if dist.get_rank() == 0:
            torch.save(snap, work / name / "step4.pt")
    for name in ("pp2", "pp2_bf16"):  # PP2 x DP1 -> TP2 x DP1 on the same 2 ranks
        copy_run(work / name / "run", work / name / "as-tp2")
        report[f"{name}->tp2"] = resumed(work / name / "as-tp2", 2, 1, SOURCES[name][2],
                                         work / name / "as-tp2.pt")
    return report


def resume(work: Path) -> dict:
    report = {}
    for name, (_, _, precision) in SOURCES.items():
        copy_run(work / name / "run", work / name / "as-1")
        report[f"{name}->1"] = resumed(work / name / "as-1", 1, 1, precision, work / name / "as-1.pt")
    return report


def main() -> None:
    mode, work = sys.argv[1], Path(sys.argv[2])
    init_distributed()
    report = {"source": source, "resume": resume}[mode](work)
    report_and_close(report)


if __name__ == "__main__":
    sys.exit(main())
