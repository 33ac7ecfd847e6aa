"""Where a trainer starts: rank 0 looks at run.dir and decides before anything writes there.

`plan_start(cfg, ctx)` runs on every rank after the run.dir lock is taken; rank 0 decides and
broadcasts the decision (or the refusal: every rank raises it). First a null ``model.vocab_size`` is
filled from the data's tokenizer (`megaret.data.vocab.resolve_vocab`, on every rank's config). Then:

1. Unfinished saves (``checkpoints/.tmp-step_*``) are removed and a checkpoint an interrupted
   re-save had moved aside is put back (`files.recover`).
2. ``checkpoint.resume=false`` on a run.dir that has checkpoints is refused, unless
   ``run.overwrite=true``: then its checkpoints, config.yaml and tensorboard/ move to
   ``run.dir/replaced-<time>/`` (nothing is deleted) and the run starts over.
3. ``checkpoint.resume=true``: the newest checkpoint that verifies. Each newer one that does not
   is moved to ``checkpoints/rejected/`` (kept); when none verifies the run stops, listing every
   reason, rather than train from step 0 over them (a later start, finding only rejected ones,
   stops too). The checkpoint's identity record (data, tokenizer, model) must be this run's
   (`megaret.checkpoint.identity`). At or past train.steps the run is `finished`.
4. No checkpoint of its own: ``checkpoint.load=PATH`` with ``checkpoint.load_mode``:
   ``weights`` (model weights; fresh optimizer, schedule, data and RNG from step 0),
   ``weights+optimizer`` (plus the optimizer state: Adam moments and fp32 masters) or ``all``
   (everything a resume restores: step, schedule position, data position, RNG, carried states).
   Else step 0.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megaret.checkpoint import files
from megaret.checkpoint.identity import check_load, check_resume, run_identity
from megaret.checkpoint.legacy import upgrade_manifest
from megaret.data.vocab import apply_vocab_fields, resolve_vocab, vocab_fields
from megaret.errors import UserError

#: what run.overwrite=true moves aside (the lock file and other files, e.g. job logs, stay)
EARLIER_RUN = ("checkpoints", "tensorboard", "config.yaml")


class RunDirError(UserError, RuntimeError):
    """run.dir holds another run that this one would overwrite."""


@dataclass
class Start:
    """What a trainer starts from (the same on every rank)."""

    identity: dict[str, Any]  # this run's identity record, written into its checkpoints
    checkpoint: Path | None = None  # the checkpoint to load; None: step 0 from scratch
    manifest: dict[str, Any] | None = None  # its verified manifest
    own: bool = True  # a checkpoint of this run.dir (a resume); False: checkpoint.load's
    load_mode: str = "all"
    step: int = 0  # the step training goes on from
    finished: bool = False  # already at or past train.steps: nothing to train
    messages: list[str] = field(default_factory=list)  # what rank 0 found, reported at load
    vocab: tuple | None = None  # model.vocab_size etc. as rank 0 filled them (megaret/data/vocab.py)

    def load(self, checkpointer: Any) -> Path | None:
        """Load what was decided into the checkpoint manager's parts (every rank); returns the
        checkpoint loaded from, if any."""
        checkpointer.messages = []
        for m in self.messages:
            checkpointer.report(m)
        if self.checkpoint is None:
            return None
        model = checkpointer.parts.get("model")
        if model is not None and hasattr(model, "load_mode"):
            model.load_mode = self.load_mode
        only = None if self.load_mode == "all" else {"model"}
        path = checkpointer.load(self.checkpoint, self.manifest, only=only, own=self.own)
        if not self.own:
            checkpointer.report(f"started from {self.checkpoint} (checkpoint.load_mode={self.load_mode}), "
                                f"at step {self.step}")
        return path


def plan_start(cfg: Any, ctx: Any) -> Start:
    """Rank 0's decision on every rank (module docstring); a refusal is raised on every rank."""
    box: list[Any] = [None]
    error = None
    if ctx.rank == 0:
        try:
            resolve_vocab(cfg)  # before the identity, which holds model.vocab_size
            box[0] = _plan(cfg)
            box[0].vocab = vocab_fields(cfg)
        except UserError as exc:
            box[0] = exc
        except Exception as exc:  # noqa: BLE001 - a bug: rank 0 re-raises it, the others stop too
            error = exc
            box[0] = RuntimeError(f"rank 0 failed to prepare run.dir {cfg.run.dir} ({exc!r}); see its error")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if isinstance(box[0], BaseException):
        raise box[0]
    apply_vocab_fields(cfg, box[0].vocab)
    return box[0]


def _step(manifest: dict[str, Any]) -> int:
    return int(upgrade_manifest(manifest)["step"])


def _plan(cfg: Any) -> Start:
    run = Path(cfg.run.dir)
    root = run / "checkpoints"
    messages = files.recover(root)
    start = Start(run_identity(cfg), messages=messages)
    if not cfg.checkpoint.resume:
        if files.list_checkpoints(root) or files.rejected_checkpoints(root):
            if not cfg.run.overwrite:
                raise RunDirError(
                    f"run.dir {run} already holds checkpoints ({_names(root)}) and checkpoint.resume=false "
                    f"would train over them: resume it (checkpoint.resume=true), give this run another "
                    f"run.dir, or add run.overwrite=true to start over (the earlier run moves to "
                    f"{run}/replaced-<time>/)")
            dest, moved = _set_aside(run)
            messages.append(f"run.overwrite=true: moved the earlier run's {', '.join(moved)} to {dest}")
    else:
        sel = files.select_newest_valid(root)
        messages.extend(sel.messages)
        for ckpt, _ in sel.rejected:
            if ckpt.exists():
                messages.append(f"moved {ckpt.name}, which failed verification, to {files.reject(ckpt)}")
        if sel.path is not None:
            note = check_resume(sel.path, sel.manifest.get("identity"), start.identity)
            if note:
                messages.append(note)
            if cfg.checkpoint.load:
                messages.append(f"checkpoint.load={cfg.checkpoint.load} is not used: run.dir has checkpoints "
                                "of its own, and a restart goes on from them")
            step = _step(sel.manifest)
            return Start(start.identity, sel.path, sel.manifest, own=True, load_mode="all", step=step,
                         finished=step >= cfg.train.steps, messages=messages)
        if sel.rejected:
            why = "; ".join(f"{p.name}: {reason}" for p, reason in sel.rejected)
            raise files.CheckpointError(
                f"every checkpoint in {root} failed verification ({why}); they were moved to "
                f"{root / files.REJECTED} (kept). Move a sound copy back into {root} to resume from it, or "
                "start over with checkpoint.resume=false run.overwrite=true")
        if files.rejected_checkpoints(root):
            raise files.CheckpointError(
                f"{root} has no usable checkpoint: the ones it had failed verification at an earlier start "
                f"and are in {root / files.REJECTED} ({_names(root)}). Move a repaired one back into {root} "
                "to resume from it, or start over with checkpoint.resume=false run.overwrite=true")
    if cfg.checkpoint.load:
        return _load_plan(cfg, start)
    return start


def _load_plan(cfg: Any, start: Start) -> Start:
    source, mode = Path(cfg.checkpoint.load), cfg.checkpoint.load_mode
    if not source.exists():
        raise files.CheckpointError(f"checkpoint.load={source} does not exist; give a checkpoint, its "
                                    "checkpoints/ or its run directory")
    ckpt = files.resolve(source)
    manifest = files.verify(ckpt)
    notes = check_load(ckpt, manifest.get("identity"), start.identity, mode)
    step = _step(manifest) if mode == "all" else 0
    return Start(start.identity, ckpt, manifest, own=False, load_mode=mode, step=step,
                 finished=step >= cfg.train.steps, messages=[*start.messages, *notes])


def _names(root: Path) -> str:
    names = [p.name for _, p in files.list_checkpoints(root)] + \
        [f"{files.REJECTED}/{p.name}" for p in files.rejected_checkpoints(root)]
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


def _replaced_dir(run: Path) -> Path:
    return run / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"


def _set_aside(run: Path) -> tuple[Path, list[str]]:
    """Move the earlier run's checkpoints, config and events into run.dir/replaced-<time>/."""
    dest, n = _replaced_dir(run), 1
    while dest.exists():
        dest, n = run / f"{_replaced_dir(run).name}.{n}", n + 1
    dest.mkdir()
    moved = []
    for name in EARLIER_RUN:
        if (run / name).exists():
            os.replace(run / name, dest / name)
            moved.append(name)
    files.fsync_path(run)
    return dest, moved
