"""Launched by tests/test_train.py: the trainer at parallel layouts equals the one-process run.

    train_parity.py reference OUT RUN_DIR      (1 rank)  one-process runs, saved to OUT
    train_parity.py layouts REF SPEC [SPEC...]           each SPEC "tp,pp,vp,zero" on this world

`reference` trains the base config with the trainer at world 1 and also (independently of
DeepSpeed and megatron's schedules) with a plain torch loop; it checks gradient accumulation
(4 micro-batches == one 4x larger micro-batch) and saves losses and final full parameters.
`layouts` trains each layout for the same steps and compares with the saved run; it also
checks ZeRO sharding of optimizer state, injects a NaN (the step is skipped and counted, the
run goes on) and checks that too many consecutive bad steps stop the run. Rank 0 prints one
line `RESULT {json}`; the pytest side asserts on it.
"""

from __future__ import annotations

import gc
import os
import sys

import torch
import torch.distributed as dist
from _common import (  # tests/distributed/_common.py (the script's own folder)
    compare,
    norm_rel,
    plain_torch,
    rel,
    report_and_close,
)

from megaret.config import load_config
from megaret.train.trainer import Trainer, TrainingError

BASE = [
    "model.num_layers=4", "model.vocab_size=128", "model.chunk_size=16", "data.seq_length=32",
    "train.steps=10", "train.micro_batch_size=1", "train.global_batch_size=8", "train.log_interval=100",
    "optimizer.warmup_steps=3", "optimizer.clip_grad=1.0", "optimizer.decay_style=cosine",
    "optimizer.min_lr=3.0e-4", "logging.tensorboard=false", "data.source=synthetic",
]
RUNS = {"root": "runs/parity", "n": 0}  # main() points the root at the directory pytest gives


def own_run_dir() -> str:
    """A run.dir of its own for every run: independent runs never resume one another (and a run.dir
    that holds checkpoints is refused with checkpoint.resume=false). The same on every rank."""
    RUNS["n"] += 1
    return f"run.dir={RUNS['root']}/run-{RUNS['n']}"


def run_trainer(overrides: list[str]):
    cfg = load_config("configs/tiny.yaml", [*BASE, own_run_dir(), *overrides])
    trainer = Trainer(cfg)
    init = trainer.full_parameters()
    results = trainer.train()
    params = trainer.full_parameters()
    trainer.close()
    return trainer, [r.loss for r in results], params, init, results


def reference(out: str, run_dir: str) -> dict:
    trainer, losses, params, init, results = run_trainer(
        [f"run.dir={run_dir}", "logging.tensorboard=true", "train.log_interval=5"])
    ref = {"losses": losses, "params": params, "init": init, "grad_norms": [r.grad_norm for r in results]}
    torch.save(ref, out)
    plain_losses, plain_params = plain_torch(trainer.cfg, trainer.ctx.tp)
    report = {"plain_torch": compare(losses, params, plain_losses, plain_params),
              "initial_loss": losses[0], "final_loss": losses[-1], "moved_norm": norm_rel(params, init)}
    # gradient accumulation: 4 micro-batches of 2 == 1 micro-batch of 8
    _, acc_losses, acc_params, _, _ = run_trainer(["train.micro_batch_size=2"])
    _, big_losses, big_params, _, _ = run_trainer(["train.micro_batch_size=8"])
    report["accumulation_4x2_vs_1x8"] = compare(acc_losses, acc_params, big_losses, big_params)
    return report


def optimizer_state_numel(engine) -> int:
    return sum(t.numel() for s in engine.optimizer.optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)


def layouts(ref_path: str, specs: list[str]) -> dict:
    ref = torch.load(ref_path)
    report = {}
    for spec in specs:
        tp, pp, vp, zero = (int(v) for v in spec.split(","))
        overrides = [f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"parallel.zero_stage={zero}",
                     f"parallel.virtual_pipeline={vp if vp > 1 else 'null'}"]
        trainer, losses, params, init, _ = run_trainer(overrides)
        ctx = trainer.ctx
        key = f"tp{tp}-pp{pp}-vp{vp}-dp{ctx.dp_size}-zero{zero}"
        entry = compare(losses, params, ref["losses"], ref["params"])
        entry["chunks"] = len(trainer.stages)
        entry["init_rel"] = max(rel(init[k], ref["init"][k]) for k in ref["init"])
        local = sum(p.numel() for c in trainer.stages for p in c.parameters())
        entry["adam_state_per_local_param"] = optimizer_state_numel(trainer.engine) / (2 * local)
        report[key] = entry
        del trainer
        gc.collect()
    return report


def nan_checks(zero: int) -> dict:
    """DP=2 on this 2-rank world: a NaN on one rank's step 4 is skipped, counted, and the run goes on."""
    cfg = load_config("configs/tiny.yaml", [*BASE, own_run_dir(), f"parallel.zero_stage={zero}",
                                            "train.steps=6"])
    trainer = Trainer(cfg)
    bad_steps: set[int] = {4}

    def poison(module, args, output):
        return output * float("nan") if trainer.step in bad_steps and dist.get_rank() == 0 else output

    trainer.stages[0].embedding.register_forward_hook(poison)
    results, before_bad = [], None
    for _ in range(cfg.train.steps):
        if trainer.step + 1 == 4:
            before_bad = trainer.full_parameters()
        results.append(trainer.train_step())
        if trainer.step == 4:
            after_bad = trainer.full_parameters()
    out = {
        "skipped": [r.skipped for r in results],
        "losses": [r.loss for r in results],
        "skipped_steps": trainer.skipped_steps,
        "unchanged_by_bad_step": max(rel(after_bad[k], before_bad[k]) for k in before_bad),
    }
    # every step from 2 on is bad: the 3rd in a row stops the run with a clear message
    trainer2 = Trainer(load_config("configs/tiny.yaml", [*BASE, own_run_dir(), f"parallel.zero_stage={zero}",
                                                          "train.max_consecutive_skips=3"]))
    bad_steps.update(range(2, 11))
    trainer = trainer2  # the hook reads `trainer.step`
    trainer2.stages[0].embedding.register_forward_hook(poison)
    try:
        trainer2.train()
        out["stopped"] = None
    except TrainingError as exc:
        out["stopped"] = {"step": trainer2.step, "message": str(exc)}
    return out


def main() -> None:
    what = sys.argv[1]
    RUNS["root"] = f"{os.path.dirname(sys.argv[2])}/runs-{what}-{os.environ.get('WORLD_SIZE', '1')}"
    if what == "reference":
        report = reference(sys.argv[2], sys.argv[3])
    else:
        specs = [s for s in sys.argv[3:] if not s.startswith("nan")]
        report = layouts(sys.argv[2], specs)
        for s in sys.argv[3:]:
            if s.startswith("nan"):
                report[s] = nan_checks(int(s[len("nan"):]))
    report_and_close(report)


if __name__ == "__main__":
    sys.exit(main())
