"""Saving and resuming training from a dict of stateful parts (`megaret.checkpoint.parts`).

`CheckpointManager.save(step)` (all ranks) writes ``root/step_NNNNNNN`` atomically: the files go
into ``.tmp-step_NNNNNNN-...``; each part saves itself there (the model part: DeepSpeed's files),
the per-rank parts' states go into ``rank_NNNNN.pt``; after a barrier rank 0 writes the manifest
(the shared parts' states, which rank wrote which rank file, sha256 of every file), renames the
directory into place, updates ``latest`` and prunes (keep_last newest + every multiple of
keep_every). A save that fails leaves every published checkpoint untouched.

`CheckpointManager.resume()` (all ranks) loads the newest checkpoint whose manifest verifies (rank
0 checks the sha256 of every file and tells the others); each rejected one is reported naming the
bad file. Then every part loads itself, in the dict's order, from its state (a rank file's: that
of the saved rank with this rank's (dp, tp, pp) coordinates, else the same DP rank, else rank 0).
Resume is bit-exact; a checkpoint of another parallel layout is resharded by the model part.
Format-1 checkpoints load too (`megaret.checkpoint.legacy`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megaret.checkpoint import files, legacy
from megaret.checkpoint.files import CheckpointError
from megaret.checkpoint.parts import Part
from megaret.checkpoint.safe import safe_load

log = logging.getLogger("megaret.checkpoint")


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def source_rank(ranks: list[dict[str, int]], dp_rank: int, tp_rank: int, pp_rank: int) -> int:
    """The saved rank whose rank file this rank loads: same coordinates, else same DP rank, else any."""
    here = (dp_rank, tp_rank, pp_rank)
    same = [r for r in ranks if (r["dp_rank"], r["tp_rank"], r["pp_rank"]) == here]
    same = same or [r for r in ranks if r["dp_rank"] == dp_rank] or ranks
    return min(r["rank"] for r in same)


class CheckpointManager:
    """Checkpoints of `parts` under `root` (every rank holds one with the same part names)."""

    def __init__(self, root: Path, parts: dict[str, Part], ctx: Any, keep_last: int,
                 keep_every: int | None = None, meta: dict[str, Any] | None = None) -> None:
        self.root, self.parts, self.ctx = Path(root), parts, ctx
        self.keep_last, self.keep_every = keep_last, keep_every
        self.meta = meta or {}  # written into the manifest as is (the resolved config)
        self.last_saved_step: int | None = None
        self.messages: list[str] = []  # what resume() reported (rejected checkpoints, the one used)

    def _report(self, msg: str) -> None:
        self.messages.append(msg)
        if self.ctx.rank == 0:
            log.warning(msg)

    # -- save --------------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        """Write the checkpoint of `step` (every rank calls this); returns its directory."""
        ctx = self.ctx
        name = files.step_name(step)
        box = [f".tmp-{name}-{os.getpid()}-{time.time_ns()}"]  # unique: never another save's files
        dist.broadcast_object_list(box, src=0)
        final, tmp = self.root / name, self.root / box[0]
        if ctx.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        dist.barrier()
        states = {n: part.save(tmp) for n, part in self.parts.items()}
        mine = {n: s for n, s in states.items() if not self.parts[n].shared}
        torch.save({"format": files.FORMAT_VERSION, "step": step, "parts": mine}, tmp / rank_file(ctx.rank))
        ranks: list[Any] = [None] * ctx.world_size
        where = {"rank": ctx.rank, "tp_rank": ctx.tp.rank, "pp_rank": ctx.pp_rank, "dp_rank": ctx.dp_rank}
        dist.all_gather_object(ranks, where)
        dist.barrier()  # every rank's files are complete
        if ctx.rank == 0:
            shared = {n: s for n, s in states.items() if self.parts[n].shared}
            manifest = {"format": files.FORMAT_VERSION, "step": step, **shared, "ranks": ranks, **self.meta}
            files.publish(tmp, final, manifest)
            for path in files.prune(self.root, self.keep_last, self.keep_every, newest=step):
                log.info("removed old checkpoint %s", path)
        dist.barrier()
        self.last_saved_step = step
        return final

    # -- resume ------------------------------------------------------------------------------

    def _select(self) -> files.Selection:
        """Rank 0 tidies up and picks the newest valid checkpoint; every rank gets its choice
        (or its refusal, e.g. a checkpoint format newer than this megaret)."""
        box: list[Any] = [None]
        if self.ctx.rank == 0:
            try:
                for m in files.recover(self.root):
                    log.warning(m)
                box[0] = files.select_newest_valid(self.root)
            except CheckpointError as exc:
                box[0] = exc
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], CheckpointError):
            raise box[0]
        return box[0]

    def resume(self) -> Path | None:
        """Load the newest valid checkpoint (every rank calls this); None when there is none."""
        ctx = self.ctx
        sel = self._select()
        self.messages = []
        for m in sel.messages:
            self._report(m)
        if sel.path is None:
            return None
        manifest = legacy.upgrade_manifest(sel.manifest)
        path = sel.path / rank_file(source_rank(manifest["ranks"], ctx.dp_rank, ctx.tp.rank, ctx.pp_rank))
        saved = legacy.upgrade_rank_state(safe_load(path), sel.manifest)
        if saved["step"] != manifest["step"]:
            raise CheckpointError(f"{path} is from step {saved['step']}, the manifest says "
                                  f"{manifest['step']}")
        for name, part in self.parts.items():
            note = part.load(sel.path, manifest.get(name) if part.shared else saved["parts"].get(name))
            if note:
                self._report(note)
        self.last_saved_step = manifest["step"]
        self._report(f"resumed from {sel.path} (step {manifest['step']})")
        return sel.path
