"""Launched by tests/test_train_engine.py: metrics, loss_mask, carried state, recompute, bf16, SP.

    train_features.py single DIR       (1 rank)  metrics/eval/profile run, loss_mask, stateful
                                                 segments, recompute and bf16 checks
    train_features.py gpu DIR          (1 rank, CUDA) a few bf16 training steps
    train_features.py layouts DIR      (2 ranks) TP=2 with/without sequence parallelism (and
                                                 recompute), PP=2, DP=2: losses, params, eval losses

Rank 0 prints one line `RESULT {json}`; the pytest side asserts on it.
"""

from __future__ import annotations

import gc
import sys

import torch
from _common import (  # tests/distributed/_common.py (the script's own folder)
    full_model,
    norm_rel,
    rel,
    report_and_close,
)

from megaret.config import load_config
from megaret.train.batches import Batch
from megaret.train.step import StateCarry, train_step
from megaret.train.trainer import Trainer

BASE = [
    "model.num_layers=2", "model.vocab_size=128", "model.chunk_size=16", "data.seq_length=32",
    "train.steps=6", "train.micro_batch_size=1", "train.global_batch_size=4", "train.log_interval=100",
    "optimizer.warmup_steps=2", "optimizer.clip_grad=1.0", "optimizer.decay_style=cosine",
    "logging.tensorboard=false", "data.source=synthetic", "train.eval_steps=0",
    "checkpoint.resume=false",  # independent runs share run.dir: never resume each other
    "checkpoint.interval=100000",
]
RUN_DIR = ["run.dir=runs/features"]  # main() points it at the directory pytest gives


def compare(run: dict, ref: dict) -> dict:
    out = {"loss_rel": max(abs(a - b) / abs(b) for a, b in zip(run["losses"], ref["losses"], strict=True)),
           "param_rel_norm": norm_rel(run["params"], ref["params"]),
           "param_rel_max": max(rel(run["params"][k], ref["params"][k]) for k in ref["params"])}
    if ref.get("evals"):
        out["eval_rel"] = max(abs(a - b) / abs(b) for a, b in zip(run["evals"], ref["evals"], strict=True))
    return out


def run(overrides: list[str], batches=None, steps: int | None = None) -> dict:
    cfg = load_config("configs/tiny.yaml", [*BASE, *RUN_DIR, *overrides])
    trainer = Trainer(cfg, batches)
    evals = []
    evaluate = trainer.evaluate
    trainer.evaluate = lambda: evals.append(evaluate()) or evals[-1]
    results = [trainer.train_step() for _ in range(cfg.train.steps if steps is None else steps)]
    out = {"losses": [r.loss for r in results], "params": trainer.full_parameters(), "evals": evals,
           "trainer": trainer, "results": results}
    trainer.close()
    return out


# ------------------------------------------------------------------------------------------
# one rank


class ListBatches:
    """Serves prepared batches by step (1-based)."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def next_batch(self, step: int) -> Batch:
        return self.batches[step - 1]


def masked_batches(steps: int, seed: int = 0) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randint(128, (4, 32), generator=gen)
        y = torch.randint(128, (4, 32), generator=gen)
        lengths = torch.tensor([32, 5, 20, 1])  # real labels per row; the rest is padding
        mask = (torch.arange(32)[None, :] < lengths[:, None]).float()
        out.append(Batch(x, y, mask))
    return out


def loss_mask_checks() -> dict:
    """The masked mean is the step's loss, and the update does not depend on the micro-batch split."""
    data = masked_batches(3)
    one = run(["train.micro_batch_size=1", "train.steps=3"], ListBatches(data))
    four = run(["train.micro_batch_size=4", "train.steps=3"], ListBatches(data))
    # step 1's loss from the initial model: sum(loss * mask) / sum(mask)
    fresh = run(["train.micro_batch_size=4", "train.steps=3"], ListBatches(data), steps=0)["trainer"]
    with torch.no_grad():
        per_token = fresh.stages[0](data[0].tokens, data[0].labels).loss
    direct = ((per_token * data[0].loss_mask).sum() / data[0].loss_mask.sum()).item()
    unmasked = per_token.mean().item()
    return {"split_1_vs_4": compare(one, four), "first_loss": one["losses"][0], "direct_masked": direct,
            "unmasked_mean": unmasked, "tokens": one["results"][0].tokens}


def stateful_checks(config: str = "configs/tiny.yaml", ignore_resets: bool = False,
                    overrides: tuple[str, ...] = ()) -> dict:
    """Two steps over consecutive segments with carried state == one pass over the whole documents.

    Two slots, micro-batch 2, two micro-batches per step (consecutive segments of the same
    slots, as the segments loader serves them). Slot 0 reads doc A (4 segments) then doc C
    (reset at step 3); slot 1 reads doc B (6 segments). lr = 0, so the model is fixed and the
    step losses are forward losses. `config`: retnet, or the windowed archs (brt / sliding:
    segments of 32 = 2 blocks of 16), whose carried caches / BRT states reset through the
    model's `reset`; ignore_resets adds a carried run with every reset flag cleared (slot 0
    then reads doc C on top of doc A's state: step 3 must differ). overrides: e.g. a pipeline,
    whose stages each carry the state of the layers they own.
    """
    L = 32
    gen = torch.Generator().manual_seed(5)
    docs = {name: torch.randint(128, (n * L + 1,), generator=gen)
            for name, n in (("A", 4), ("B", 6), ("C", 2))}
    slots = [[("A", i) for i in range(4)] + [("C", i) for i in range(2)], [("B", i) for i in range(6)]]

    def segment(name: str, i: int):
        d = docs[name]
        return d[i * L:(i + 1) * L], d[i * L + 1:(i + 1) * L + 1]

    batches = []
    for step in range(3):
        rows, resets = [], []
        for seg in (2 * step, 2 * step + 1):
            for slot in slots:
                rows.append(segment(*slot[seg]))
                resets.append(slot[seg][1] == 0)
        x = torch.stack([r[0] for r in rows])
        y = torch.stack([r[1] for r in rows])
        batches.append(Batch(x, y, torch.ones(4, L), reset=torch.tensor(resets)))
    out = {}
    for carried in (True, False):
        cfg = load_config(config, [*BASE, *RUN_DIR, "train.micro_batch_size=2", "data.packing=segments",
                                   *overrides])
        trainer = Trainer(cfg, ListBatches(batches))
        if not carried:
            trainer.carry = None
        losses = [train_step(trainer.engine, trainer.stages, trainer.ctx, b, 2, 0.0, 1, trainer.carry).loss
                  for b in batches]
        out["carried" if carried else "not_carried"] = losses
        if ignore_resets:
            no_reset = [Batch(b.tokens, b.labels, b.loss_mask, reset=torch.zeros_like(b.reset))
                        for b in batches]
            carry = StateCarry(trainer.carry.state_type)
            out["resets_ignored"] = [train_step(trainer.engine, trainer.stages, trainer.ctx, b, 2, 0.0, 1,
                                                carry).loss for b in no_reset]
            ignore_resets = False
        tp = trainer.ctx.tp
        trainer.close()
    model = full_model(cfg, tp)
    with torch.no_grad():
        full = {name: model(d[None, :-1], d[None, 1:]).loss[0] for name, d in docs.items()}  # (n * L,)
    ref = []
    for step in range(3):
        parts = [full[slot[seg][0]][slot[seg][1] * L:(slot[seg][1] + 1) * L]
                 for seg in (2 * step, 2 * step + 1) for slot in slots]
        ref.append(torch.cat(parts).mean().item())
    out["one_pass"] = ref
    return out


def recompute_checks() -> dict:
    off = run(["train.steps=3"])
    on = run(["train.steps=3", "train.recompute=true"])
    return compare(on, off)


def bf16_checks() -> dict:
    r = run(["train.precision=bf16", "train.steps=12", "optimizer.lr=3.0e-3", "optimizer.warmup_steps=2",
             "train.micro_batch_size=2"])
    dtypes = sorted({str(p.dtype) for p in r["trainer"].stages[0].parameters()})
    return {"losses": r["losses"], "param_dtypes": dtypes}


def single(run_dir: str) -> dict:
    metrics = run([f"run.dir={run_dir}/metrics", "logging.tensorboard=true", "train.steps=4",
                   "train.eval_interval=2", "train.eval_steps=2", "logging.peak_tflops=0.5",
                   "logging.profile=true", "train.log_interval=2"])
    report = {"metrics": {"losses": metrics["losses"], "evals": metrics["evals"]}}
    report["loss_mask"] = loss_mask_checks()
    report["stateful"] = stateful_checks()
    report["stateful_brt"] = stateful_checks("configs/brt-tiny.yaml", ignore_resets=True)
    report["stateful_sliding"] = stateful_checks("configs/sliding-tiny.yaml", ignore_resets=True)
    report["recompute"] = recompute_checks()
    report["bf16"] = bf16_checks()
    return report


# ------------------------------------------------------------------------------------------
# two ranks


def layouts() -> dict:
    common = ["train.eval_interval=3", "train.eval_steps=2"]
    specs = {
        "tp2": ["parallel.tensor=2"],
        "tp2-sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
        "tp2-sp-recompute": ["parallel.tensor=2", "parallel.sequence_parallel=true", "train.recompute=true"],
        "pp2": ["parallel.pipeline=2"],
        "dp2": [],
        # the Transformer family under sequence parallelism and recomputation, against TP=2 alone
        "brt-tp2": ["parallel.tensor=2", "model.arch=brt"],
        "brt-tp2-sp-recompute": ["parallel.tensor=2", "model.arch=brt", "parallel.sequence_parallel=true",
                                 "train.recompute=true"],
        "transformer-tp2": ["parallel.tensor=2", "model.arch=transformer"],
        "transformer-tp2-sp-recompute": ["parallel.tensor=2", "model.arch=transformer",
                                         "parallel.sequence_parallel=true", "train.recompute=true"],
    }
    brt = ["model.block_size=16", "model.num_states=8", "model.recurrent_layers=[1]"]
    runs, report = {}, {}
    for name, overrides in specs.items():
        r = run([*common, *overrides, *(brt if "model.arch=brt" in overrides else [])])
        runs[name] = {k: r[k] for k in ("losses", "params", "evals")}
        runs[name]["sp_tagged"] = sum(getattr(p, "sequence_parallel", False)
                                      for c in r["trainer"].stages for p in c.parameters())
        del r
        gc.collect()
    for name in specs:
        ref = next(r for r in ("brt-tp2", "transformer-tp2", "tp2") if name.startswith(r.removesuffix("tp2")))
        if name != ref:
            report[name] = compare(runs[name], runs[ref])
            report[name]["sp_tagged"] = runs[name]["sp_tagged"]
    report["tp2"] = {"losses": runs["tp2"]["losses"], "evals": runs["tp2"]["evals"]}
    # stateful segments under a pipeline: each stage carries its own layers' state
    report["stateful_pp2"] = stateful_checks(overrides=("parallel.pipeline=2",))
    report["stateful_brt_pp2"] = stateful_checks("configs/brt-tiny.yaml", overrides=("parallel.pipeline=2",))
    return report


def main() -> None:
    RUN_DIR[0] = f"run.dir={sys.argv[2]}/other"
    if sys.argv[1] == "gpu":  # a few bf16 steps on the CUDA device (tests/test_gpu_smoke.py)
        r = run(["train.precision=bf16", "train.steps=8", "optimizer.lr=3.0e-3", "train.micro_batch_size=2",
                 "train.eval_interval=4", "train.eval_steps=1"])
        from megaret.parallel.cpu_adapters import cpu_adapters_active

        report = {"losses": r["losses"], "evals": r["evals"], "device": str(r["trainer"].ctx.device),
                  "backend": r["trainer"].ctx.backend, "cpu_adapters": cpu_adapters_active()}
    else:
        report = single(sys.argv[2]) if sys.argv[1] == "single" else layouts()
    report_and_close(report)


if __name__ == "__main__":
    sys.exit(main())
