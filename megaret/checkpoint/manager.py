"""Saving and resuming training from a dict of stateful parts (`megaret.checkpoint.parts`).

`CheckpointManager.save(step)` (all ranks) writes ``root/step_NNNNNNN`` atomically: the files go
into ``.tmp-step_NNNNNNN-...``; each part saves itself there (the model part: DeepSpeed's files),
the per-rank parts' states go into ``rank_NNNNN.pt``; after a barrier rank 0 writes the manifest
(the shared parts' states, which rank on which host wrote which rank file, sha256 of every file),
renames the directory into place, updates ``latest`` and prunes (keep_last newest + every multiple of
keep_every). A save that fails on any rank stops every rank (agreed after each phase), removes its
directory and leaves every published checkpoint untouched; a full disk is one line naming it.

`CheckpointManager.resume()` (all ranks) loads the newest checkpoint whose manifest verifies (rank
0 checks the sha256 of every file and tells the others); each rejected one is reported naming the
bad file. (The trainer decides where it starts with `megaret.train.start` and calls `load`,
which can also load only some parts: checkpoint.load_mode.) Then every part loads itself, in
the dict's order, from its state (a rank file's: that of the saved rank with this rank's
(dp, tp, pp) coordinates, else the same DP rank, else rank 0).
Resume is bit-exact; a checkpoint of another parallel layout is resharded by the model part.
Format-1 checkpoints load too (`megaret.checkpoint.legacy`).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import time
from collections.abc import Collection
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

    def report(self, msg: str) -> None:
        self.messages.append(msg)
        if self.ctx.rank == 0:
            log.warning(msg)

    # -- save --------------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        """Write the checkpoint of `step` (every rank calls this); returns its directory.

        A failure on any rank stops every rank at the next agreement point (no rank waits on a peer
        that gave up): the unfinished directory is removed and the checkpoints already published are
        untouched. Running out of disk space raises a one-line CheckpointError naming the device,
        the step not written and the last good checkpoint."""
        ctx = self.ctx
        name = files.step_name(step)
        box = [f".tmp-{name}-{os.getpid()}-{time.time_ns()}"]  # unique: never another save's files
        dist.broadcast_object_list(box, src=0)
        final, tmp = self.root / name, self.root / box[0]
        error = None
        if ctx.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                tmp.mkdir()
            except OSError as exc:
                error = exc
        self._agree(step, tmp, error)
        states, error = {}, None
        for n, part in self.parts.items():  # every part, even after a failure: some hold collectives
            try:
                states[n] = part.save(tmp)
            except Exception as exc:  # noqa: BLE001 - agreed on and re-raised below
                error = error or exc
        if error is None:
            mine = {n: s for n, s in states.items() if not self.parts[n].shared}
            try:
                torch.save({"format": files.FORMAT_VERSION, "step": step, "parts": mine},
                           tmp / rank_file(ctx.rank))
            except Exception as exc:  # noqa: BLE001
                error = exc
        ranks: list[Any] = [None] * ctx.world_size
        where = {"rank": ctx.rank, "tp_rank": ctx.tp.rank, "pp_rank": ctx.pp_rank, "dp_rank": ctx.dp_rank,
                 "host": socket.gethostname()}  # which machine wrote this rank's files
        dist.all_gather_object(ranks, where)
        self._agree(step, tmp, error)  # every rank's files are complete
        if ctx.rank == 0:
            try:
                shared = {n: s for n, s in states.items() if self.parts[n].shared}
                manifest = {"format": files.FORMAT_VERSION, "step": step, **shared, "ranks": ranks,
                            **self.meta}
                files.publish(tmp, final, manifest)
            except Exception as exc:  # noqa: BLE001
                error = exc
            else:
                for path in files.prune(self.root, self.keep_last, self.keep_every, newest=step):
                    log.info("removed old checkpoint %s", path)
        self._agree(step, tmp, error)
        self.last_saved_step = step
        return final

    def _agree(self, step: int, tmp: Path, error: BaseException | None) -> None:
        """Every rank learns whether any rank failed (0: none, 1: out of disk space, 2: another
        error); on a failure rank 0 removes `tmp` and all raise: the one-line CheckpointError for
        a full disk, else the failing rank its own error and the others a RuntimeError."""
        ctx = self.ctx
        code = 0 if error is None else 1 if out_of_space(error, tmp) else 2
        flag = torch.tensor([float(code)], device=ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        worst = int(flag.item())
        if worst == 0:
            return
        box: list[Any] = [None]
        if ctx.rank == 0:
            box[0] = self._no_space(step) if worst == 1 else None  # the free space before the clean-up
            shutil.rmtree(tmp, ignore_errors=True)
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise CheckpointError(box[0]) from error
        if error is not None:
            raise error
        raise RuntimeError(f"saving the checkpoint of step {step} failed on another rank (see its error); "
                           f"the earlier checkpoints in {self.root} are untouched")

    def _no_space(self, step: int) -> str:
        device, mount = mount_of(self.root)
        try:
            free = f", {shutil.disk_usage(self.root).free / 2**20:.1f} MiB free"
        except OSError:
            free = ""
        last = self.last_saved_step
        good = (f"last good checkpoint is step {last} ({self.root / files.step_name(last)}), intact; free "
                "space there and run again to resume from it" if last is not None else
                "no checkpoint of this run was written yet; free space there and run again")
        return f"no space left on {device} ({mount}{free}): checkpoint of step {step} not written; {good}"

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
        sel = self._select()
        self.messages = []
        for m in sel.messages:
            self.report(m)
        if sel.path is None:
            return None
        return self.load(sel.path, sel.manifest)

    def load(self, ckpt: Path, manifest: dict[str, Any], only: Collection[str] | None = None,
             own: bool = True) -> Path:
        """Load the parts (those named in `only`, else all) from checkpoint `ckpt`, whose manifest
        rank 0 verified (every rank calls this). `own`: a checkpoint of this run (its last save);
        else one it starts from (checkpoint.load), saved again at the end however far it trains."""
        ctx = self.ctx
        raw, manifest = manifest, legacy.upgrade_manifest(manifest)
        path = ckpt / rank_file(source_rank(manifest["ranks"], ctx.dp_rank, ctx.tp.rank, ctx.pp_rank))
        saved = legacy.upgrade_rank_state(safe_load(path), raw)
        if saved["step"] != manifest["step"]:
            raise CheckpointError(f"{path} is from step {saved['step']}, the manifest says "
                                  f"{manifest['step']}")
        for name, part in self.parts.items():
            if only is not None and name not in only:
                continue
            note = part.load(ckpt, manifest.get(name) if part.shared else saved["parts"].get(name))
            if note:
                self.report(note)
        if own:
            self.last_saved_step = manifest["step"]
            self.report(f"resumed from {ckpt} (step {manifest['step']})")
        return ckpt


def out_of_space(error: BaseException, path: Path) -> bool:
    """Whether `error` (raised while writing under `path`) means the disk or quota is full: ENOSPC or
    EDQUOT anywhere in its chain, or an opaque writer error (torch.save's says only "file write
    failed") while the file system has (almost) nothing left."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(seen) for s in ("No space left", "Disk quota exceeded")):
            return True
        seen = seen.__cause__ or seen.__context__
    where = next((p for p in (Path(path), *Path(path).parents) if p.exists()), None)
    if where is None:
        return False
    try:
        usage = shutil.disk_usage(where)
    except OSError:
        return False
    return usage.free < min(64 * 2**20, usage.total // 20)


def mount_of(path: Path) -> tuple[str, str]:
    """(device, mount point) of the file system holding `path`, from /proc/mounts."""
    real = os.path.realpath(next((p for p in (Path(path), *Path(path).parents) if p.exists()), Path(path)))
    device, mount = "", ""
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                dev, mnt = line.split()[:2]
                mnt = mnt.replace("\\040", " ")  # /proc/mounts escapes spaces
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(mount):
                    device, mount = dev, mnt
    except OSError:
        pass
    return device or "the file system", mount or str(path)
