"""Launched by tests/test_checkpoint.py (2 ranks): bit-exact resume, corruption fallback, export.

    checkpoint_resume.py WORKDIR SPEC [SPEC...] [corrupt] [layout] [malicious]

Each SPEC "tp,pp,zero,source" (source: synthetic | shards) trains three ways in WORKDIR/<key>/:
`ref` 10 steps uninterrupted (checkpoint.interval=4: saves at 4, 8 and the end, 10); `run` 6
steps then stops (its newest checkpoint is step 4); then a new Trainer in `run` resumes from
step 4 and trains to 10. Reported: the loss differences of steps 5..10 and the final weight
differences against `ref` (expected exactly 0), and the consolidated export of `run` against
the gathered weights. `corrupt` damages checkpoints of the first SPEC's `run` and restarts;
`layout` restarts the TP2 run at TP1 x DP2 with ZeRO-0 (refused: resharding needs ZeRO-1/2;
tests/test_reshard.py covers the supported cases);
`malicious` plants a code-running pickle. Rank 0 prints one line `RESULT {json}`.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _common import report_and_close  # tests/distributed/_common.py (the script's own folder)

from megaret.checkpoint.files import MANIFEST, list_checkpoints, sha256_file
from megaret.config import load_config
from megaret.train.trainer import Trainer

COMMON = [
    "model.num_layers=2", "model.chunk_size=16", "train.steps=10", "train.micro_batch_size=1",
    "train.global_batch_size=4", "train.log_interval=100", "train.eval_steps=0", "optimizer.warmup_steps=3",
    "optimizer.clip_grad=1.0", "optimizer.decay_style=cosine", "optimizer.min_lr=3.0e-4",
    "logging.tensorboard=false", "data.num_workers=0",
    "checkpoint.interval=4", "checkpoint.keep_last=2", "checkpoint.keep_every=4",
]
SOURCES = {
    "synthetic": ["data.source=synthetic", "model.vocab_size=128", "data.seq_length=32"],
    # the embedded default corpus (cached under ~/.cache/megaret/data): 512 ids, 64 tokens
    "shards": ["data.source=shards", "model.vocab_size=512", "data.seq_length=64"],
}


def overrides(spec: str) -> list[str]:
    tp, pp, zero, source, *precision = spec.split(",")  # an optional 5th field: train.precision
    return [*COMMON, *SOURCES[source], f"parallel.tensor={tp}", f"parallel.pipeline={pp}",
            f"parallel.zero_stage={zero}", *(f"train.precision={p}" for p in precision)]


def trainer_at(run_dir: Path, spec: str, *extra: str) -> Trainer:
    return Trainer(load_config("configs/tiny.yaml", [*overrides(spec), f"run.dir={run_dir}", *extra]))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k] - b[k]).abs().max().item() for k in b)


def all_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def loader_state(trainer: Trainer):
    loader = getattr(trainer.batches, "loader", None)
    return None if loader is None else loader.state_dict()


def finish(trainer: Trainer) -> None:
    trainer.close()
    del trainer
    gc.collect()


def resume_check(work: Path, spec: str) -> dict:
    key = "tp{}-pp{}-zero{}-{}".format(*spec.split(",")) + "".join(f"-{p}" for p in spec.split(",")[4:])
    base = work / key
    ref = trainer_at(base / "ref", spec)
    ref_losses, snapshots = [], {}
    for _ in range(6):
        ref_losses.append(ref.train_step().loss)
        if ref.step == 4:
            snapshots[4] = ref.full_parameters()
    snapshots["ref_6"] = ref.full_parameters()
    ref_losses += [r.loss for r in ref.train()]  # steps 7..10 and the final save
    ref_params, ref_loader = ref.full_parameters(), loader_state(ref)
    ref_ckpts = sorted(p.name for p in (base / "ref" / "checkpoints").iterdir())
    finish(ref)

    first = trainer_at(base / "run", spec)
    first_losses = [first.train_step().loss for _ in range(6)]  # saves step 4, then "dies" after 6
    first_params = first.full_parameters()
    finish(first)

    second = trainer_at(base / "run", spec)
    resumed_from = second.resumed_from.name if second.resumed_from else None
    resumed_step, resumed_params = second.step, second.full_parameters()
    losses = [r.loss for r in second.train()]
    params, loader = second.full_parameters(), loader_state(second)
    run_ckpts = sorted(p.name for p in (base / "run" / "checkpoints").iterdir())
    finish(second)

    out = {
        "ref_checkpoints": ref_ckpts, "run_checkpoints": run_ckpts,
        "resumed_from": resumed_from, "resumed_step": resumed_step,
        "resumed_params_equal_step4": all_equal(resumed_params, snapshots[4]),
        "first_run_equal": first_losses == ref_losses[:6] and all_equal(first_params, snapshots["ref_6"]),
        "ref_losses": ref_losses, "resumed_losses": losses,
        "loss_max_abs_diff": max(abs(a - b) for a, b in zip(losses, ref_losses[4:], strict=True)),
        "losses_equal": losses == ref_losses[4:],
        "param_max_abs_diff": max_diff(params, ref_params),
        "params_equal": all_equal(params, ref_params),
        "n_tensors": len(params),
        "loader_state_equal": loader == ref_loader,
        "loader_state_is_set": loader is not None,
        "moved_from_step4": max_diff(ref_params, snapshots[4]),
    }
    if dist.get_rank() == 0:  # offline export of the resumed run's final checkpoint
        from megaret.export import export

        path = export(base / "run", work / f"export-{key}.pt")
        exported = torch.load(path, weights_only=True)
        tensors = {k: v for k, v in exported.items() if torch.is_tensor(v)}
        # a bf16 run exports its fp32 masters: rounded to bf16 they are the weights it trains with
        trained = torch.bfloat16 if spec.endswith(",bf16") else torch.float32
        rounded = {k: v.to(trained).to(params[k].dtype) for k, v in tensors.items()}
        out["export_equal"] = all_equal(rounded, params)
        out["export_is_not_rounded"] = any(not torch.equal(v, params[k]) for k, v in tensors.items())
        out["export_dtypes"] = sorted({str(v.dtype) for v in tensors.values()})
        out["export_extra"] = sorted({repr(v) for k, v in exported.items() if k not in tensors})
        torch.save(params, work / f"gathered-{key}.pt")
        out["overrides"] = overrides(spec)
    dist.barrier()
    return out


def flip_tensor_bytes(path: Path) -> None:
    """Change bytes inside tensor data (the middle of the largest stored tensor), not the size."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0x5A for b in data[mid:mid + 64])
    path.write_bytes(bytes(data))


def corrupt_check(work: Path, spec: str) -> dict:
    """On the first spec's resumed run (checkpoints 4, 8, 10): damage 10, then 8, restart each time."""
    key = "tp{}-pp{}-zero{}-{}".format(*spec.split(",")) + "".join(f"-{p}" for p in spec.split(",")[4:])
    run = work / key / "run" / "checkpoints"
    out: dict = {}
    if dist.get_rank() == 0:
        # 1) bytes changed inside tensor data of step 10's ZeRO shard; a partial step 12 (no manifest)
        flip_tensor_bytes(run / "step_0000010" / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        (run / "step_0000012" / "ds").mkdir(parents=True)
        (run / "step_0000012" / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    dist.barrier()
    t = trainer_at(run.parent, spec)
    out["flipped"] = {"resumed_from": t.resumed_from.name, "step": t.step,
                      "messages": t.checkpointer.messages}
    # it goes on from step 8: steps 9 and 10 again, saving a sound step 10 in place of the bad one
    out["flipped"]["losses_9_10"] = [r.loss for r in t.train()]
    finish(t)
    if dist.get_rank() == 0:
        from megaret.checkpoint.files import verify

        verify(run / "step_0000010")  # raises if the re-saved checkpoint is not sound
        out["flipped"]["resaved_step10_verifies"] = True
        # 2) truncate step 10's model file and step 8's optimizer shard: back to step 4
        model = run / "step_0000010" / "ds" / "mp_rank_00_model_states.pt"
        os.truncate(model, model.stat().st_size // 2)
        optim = run / "step_0000008" / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        os.truncate(optim, optim.stat().st_size - 100)
    dist.barrier()
    t = trainer_at(run.parent, spec)
    out["truncated"] = {"resumed_from": t.resumed_from.name, "step": t.step,
                        "messages": t.checkpointer.messages}
    finish(t)
    out["rejected"] = sorted(p.name for p in (run / "rejected").iterdir())  # moved aside, none deleted
    return out


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint file would carry."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_check(work: Path, spec: str) -> dict:
    """Replace the newest checkpoint's model file with a code-running pickle and fix its manifest
    entry (so only the loader stands in the way): the Trainer must refuse it without running it."""
    key = "tp{}-pp{}-zero{}-{}".format(*spec.split(",")) + "".join(f"-{p}" for p in spec.split(",")[4:])
    run = work / key / "run" / "checkpoints"
    marker = work / "PWNED"
    newest = list_checkpoints(run)[-1][1]  # step 4: corrupt_check's damaged 8 and 10 went to rejected/
    if dist.get_rank() == 0:
        bad = newest / "ds" / "mp_rank_00_model_states.pt"
        torch.save({"module": RunsCode(str(marker))}, bad)
        manifest = json.loads((newest / MANIFEST).read_text())
        entry = {"sha256": sha256_file(bad), "size": bad.stat().st_size}
        manifest["files"]["ds/mp_rank_00_model_states.pt"] = entry
        (newest / MANIFEST).write_text(json.dumps(manifest))
    dist.barrier()
    try:
        trainer_at(run.parent, spec)
        refused = None
    except Exception as exc:  # noqa: BLE001 - what matters is that it refused, and how
        refused = f"{type(exc).__name__}: {str(exc)[:400]}"
    dist.barrier()
    return {"refused": refused, "marker_created": marker.exists()}


def layout_check(work: Path) -> dict:
    """A run directory saved at TP2 x DP1 (ZeRO-1), restarted at TP1 x DP2 with ZeRO-0: refused with
    what differs (resharding reads and fills ZeRO-1/2 optimizer partitions only)."""
    try:
        trainer_at(work / "tp2-pp1-zero1-synthetic" / "run", "1,1,0,synthetic")
        return {"refused": None}
    except Exception as exc:  # noqa: BLE001
        return {"refused": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    work = Path(sys.argv[1])
    specs = [s for s in sys.argv[2:] if "," in s]
    report = {}
    for spec in specs:
        report[spec] = resume_check(work, spec)
    if "corrupt" in sys.argv[2:]:
        report["corrupt"] = corrupt_check(work, specs[0])
    if "layout" in sys.argv[2:]:
        report["layout"] = layout_check(work)
    if "malicious" in sys.argv[2:]:
        report["malicious"] = malicious_check(work, specs[0])
    report_and_close(report)


if __name__ == "__main__":
    sys.exit(main())
