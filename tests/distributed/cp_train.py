"""Launched by tests/test_context_parallel.py on 4 CPU ranks: the trainer under context
parallelism equals the same training without it, and CP checkpoints resume at other CP sizes.

The reference is the trainer at DP=4 (world 4, CP=1), which tests/test_train.py shows equals one
process. Each layout (CP=4; CP=2 x TP=2; CP=2 x PP=2; CP=2 x DP=2 with ZeRO-1) trains the same
steps on the same global batches; step losses and final full parameters are compared. Then a
CP=2 run that stops at its step-4 checkpoint resumes at CP=2, CP=1 and CP=4 (the model part
reshards ZeRO's DP x CP shards; CP shards no weights, only the sequence) and each continuation
is compared with the uninterrupted CP=2 run. The Transformer baseline (Ulysses attention) trains
at CP=2 x PP=2 and CP=2 x DP=2 (ZeRO-1) against its own DP=4 run. RetNet and the sliding-window
arch (its halo) train on packed documents with data.reset_at_doc_boundaries (starts inside
slices and on the slice boundary) at CP=2 x DP=2 against TP=2 x DP=2 (the same DP split of each
batch; TP equals one process in tests/test_train_archs.py). Rank 0 prints one line
`RESULT {json}`.
"""

from __future__ import annotations

import gc
import sys

from _common import (  # tests/distributed/_common.py (the script's own folder)
    PackedDocs,
    compare,
    report_and_close,
)

from megaret.config import load_config
from megaret.train.trainer import Trainer

BASE = [
    "model.num_layers=2", "model.vocab_size=128", "model.chunk_size=4", "data.seq_length=32",
    "train.steps=6", "train.micro_batch_size=1", "train.global_batch_size=4", "train.log_interval=100",
    "optimizer.warmup_steps=2", "optimizer.clip_grad=1.0", "logging.tensorboard=false",
    "data.source=synthetic", "train.eval_interval=1000", "checkpoint.interval=4",
]


# 4 samples of T=32: document starts inside either CP=2 slice and on its boundary (16)
DOC_LENGTHS = [(5, 14, 13), (16, 16), (1, 20, 11), (9, 7, 16)]


def train(run_dir: str, overrides: list[str], stop_at: int | None = None, config: str = "configs/tiny.yaml",
          packed: bool = False):
    """Train (on from run.dir's last checkpoint, if any) to train.steps, or stop after step
    `stop_at` (train_step saves the checkpoint of every checkpoint.interval); `packed`: on
    PackedDocs of DOC_LENGTHS, this DP rank's rows."""
    cfg = load_config(config, [*BASE, f"run.dir={run_dir}", *overrides])
    source = PackedDocs(cfg.model.vocab_size, DOC_LENGTHS) if packed else None
    trainer = Trainer(cfg, batches=source)
    if source is not None:
        source.ctx = trainer.ctx
    results = []
    while trainer.step < (stop_at or cfg.train.steps):
        results.append(trainer.train_step())
    params = trainer.full_parameters()
    trainer.close()
    gc.collect()
    return [r.loss for r in results], params


def main() -> None:
    root = sys.argv[1]
    report = {}
    ref_losses, ref_params = train(f"{root}/ref", [])
    layouts = {
        "cp4": ["parallel.context_parallel=4"],
        "cp2tp2": ["parallel.context_parallel=2", "parallel.tensor=2"],
        "cp2pp2": ["parallel.context_parallel=2", "parallel.pipeline=2"],
        "cp2dp2": ["parallel.context_parallel=2", "parallel.zero_stage=1"],
    }
    cp2 = None
    for name, overrides in layouts.items():
        losses, params = train(f"{root}/{name}", overrides)
        report[name] = compare(losses, params, ref_losses, ref_params)
        if name == "cp2dp2":
            cp2 = losses, params
    # resume: stop a CP=2 run at its step-4 checkpoint, continue at CP=2, 1 and 4
    for cp in (2, 1, 4):
        run_dir = f"{root}/resume-cp{cp}"
        first, _ = train(run_dir, ["parallel.context_parallel=2"], stop_at=4)
        rest, params = train(run_dir, [f"parallel.context_parallel={cp}"])
        report[f"resume_cp2_to_cp{cp}"] = compare(first + rest, params, *cp2)
    transformer = "configs/transformer-tiny.yaml"
    ref_losses, ref_params = train(f"{root}/transformer-ref", [], config=transformer)
    for name in ("cp2pp2", "cp2dp2"):
        losses, params = train(f"{root}/transformer-{name}", layouts[name], config=transformer)
        report[f"transformer/{name}"] = compare(losses, params, ref_losses, ref_params)
    for arch, config, extra in (("retnet", "configs/tiny.yaml", []),
                                ("sliding", "configs/sliding-tiny.yaml", ["model.block_size=8"])):
        docs = [*extra, "data.reset_at_doc_boundaries=true", "checkpoint.interval=1000"]
        ref_losses, ref_params = train(f"{root}/{arch}-docs-tp2dp2", [*docs, "parallel.tensor=2"],
                                       config=config, packed=True)
        losses, params = train(f"{root}/{arch}-docs-cp2dp2", [*docs, "parallel.context_parallel=2"],
                               config=config, packed=True)
        report[f"{arch}/docs/cp2dp2"] = compare(losses, params, ref_losses, ref_params)
    report_and_close(report)


if __name__ == "__main__":
    sys.exit(main())
