"""Launched by tests/test_train_archs.py: the trainer for BRT and the Transformer baseline, and
document resets in packed samples (RetNet, the Transformer, BRT).

    train_archs.py reference OUT RUN_DIR   (1 rank)  one-process runs of both archs, saved to OUT;
                                                      also a plain torch loop per arch and the
                                                      doc-reset first-step check
    train_archs.py layouts REF RUN_DIR     (4 ranks) (TP, PP, DP) = (2, 2, 1), (1, 1, 4), (2, 1, 2) ZeRO-1
                                                      for both archs against the saved runs

Rank 0 prints one line `RESULT {json}`; the pytest side asserts on it.
"""

from __future__ import annotations

import gc
import sys

import torch
from _common import (  # tests/distributed/_common.py (the script's own folder)
    PackedDocs,
    compare,
    full_model,
    norm_rel,
    plain_torch,
    rel,
    report_and_close,
)

from megaret.config import load_config
from megaret.train.trainer import Trainer

COMMON = [
    "model.vocab_size=128", "data.seq_length=32", "data.source=synthetic",
    "train.steps=10", "train.micro_batch_size=1", "train.global_batch_size=8", "train.log_interval=100",
    "train.eval_steps=0", "optimizer.warmup_steps=3", "optimizer.clip_grad=1.0",
    "optimizer.decay_style=cosine", "optimizer.min_lr=3.0e-4", "logging.tensorboard=false",
    "checkpoint.resume=false", "checkpoint.interval=1000",
]
ARCHS = {
    # 4 layers (PP=2: layers 0-1 with the recurrent layer 1, and 2-3), blocks of 16, segments of 32
    "brt": ("configs/brt-tiny.yaml", ["model.num_layers=4", "model.recurrent_layers=[1]"]),
    "transformer": ("configs/transformer-tiny.yaml", ["model.num_layers=2"]),
}


def config(arch: str, overrides: list[str]):
    path, extra = ARCHS[arch]
    return load_config(path, [*COMMON, *extra, *overrides])


def run_trainer(arch: str, overrides: list[str]):
    """Train with the trainer, step by step (no checkpoint writing: that is another test's)."""
    trainer = Trainer(config(arch, overrides))
    init = trainer.full_parameters()
    results = [trainer.train_step() for _ in range(trainer.cfg.train.steps)]
    params = trainer.full_parameters()
    trainer.close()
    return trainer, [r.loss for r in results], params, init


DOC_RESET_ARCHS = {  # config, overrides, packed lengths (the windowed archs: block-aligned starts)
    "retnet": ("configs/tiny.yaml", ["model.chunk_size=16"], PackedDocs.ANY),
    "transformer": ("configs/transformer-tiny.yaml", [], PackedDocs.ANY),
    "brt": ("configs/brt-tiny.yaml", ["model.block_size=8", "model.num_layers=2",
                                      "model.recurrent_layers=[1]"], PackedDocs.BLOCK_ALIGNED),
}


def doc_reset_check(run_dir: str) -> dict:
    """Each arch trained with data.reset_at_doc_boundaries on a packed batch: the first step's
    loss equals the mean loss of every document run separately through the initial model."""
    report = {}
    for arch, (path, extra, lengths) in DOC_RESET_ARCHS.items():
        base = [*COMMON, *extra, "train.steps=1", f"run.dir={run_dir}/docreset-{arch}"]
        out = {}
        for on in (True, False):
            cfg = load_config(path, [*base, f"data.reset_at_doc_boundaries={str(on).lower()}"])
            src = PackedDocs(cfg.model.vocab_size, lengths)
            trainer = Trainer(cfg, batches=src)
            out["trainer_on" if on else "trainer_off"] = trainer.train_step().loss
            trainer.close()
            tp = trainer.ctx.tp
            del trainer
            gc.collect()
        model = full_model(cfg, tp)
        with torch.no_grad():
            per_doc = [model(d[None, :-1], d[None, 1:]).loss for row in src.docs for d in row]
        out["separate"] = torch.cat([x.reshape(-1) for x in per_doc]).double().mean().item()
        report[arch] = out
    return report


def reference(out: str, run_dir: str) -> dict:
    ref, report = {}, {}
    for arch in ARCHS:
        trainer, losses, params, init = run_trainer(arch, [f"run.dir={run_dir}/{arch}-ref"])
        ref[arch] = {"losses": losses, "params": params, "init": init}
        plain_losses, plain_params = plain_torch(trainer.cfg, trainer.ctx.tp)
        report[arch] = {"plain_torch": compare(losses, params, plain_losses, plain_params),
                        "initial_loss": losses[0], "final_loss": losses[-1],
                        "moved_norm": norm_rel(params, init)}
        del trainer
        gc.collect()
    torch.save(ref, out)
    report["doc_reset"] = doc_reset_check(run_dir)
    return report


def layouts(ref_path: str, run_dir: str) -> dict:
    ref = torch.load(ref_path)
    report = {}
    for arch in ARCHS:
        for tp, pp in ((2, 2), (1, 1), (2, 1)):
            trainer, losses, params, init = run_trainer(arch, [
                f"parallel.tensor={tp}", f"parallel.pipeline={pp}", "parallel.zero_stage=1",
                f"run.dir={run_dir}/{arch}-tp{tp}-pp{pp}"])
            entry = compare(losses, params, ref[arch]["losses"], ref[arch]["params"])
            entry["init_rel"] = max(rel(init[k], ref[arch]["init"][k]) for k in ref[arch]["init"])
            report[f"{arch}-tp{tp}-pp{pp}-dp{trainer.ctx.dp_size}-zero1"] = entry
            del trainer
            gc.collect()
    return report


def main() -> None:
    what = sys.argv[1]
    report = reference(sys.argv[2], sys.argv[3]) if what == "reference" else layouts(sys.argv[2], sys.argv[3])
    report_and_close(report)


if __name__ == "__main__":
    sys.exit(main())
