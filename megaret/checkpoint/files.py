"""On-disk checkpoint directories: naming, atomic publication, manifests, verification, pruning.

Layout of ``run.dir/checkpoints``::

    latest                    the name of the newest published checkpoint (written atomically)
    step_0000010/             one directory per saved step, renamed into place when complete
        manifest.json         sha256 + size of every other file, the shared parts' states (counters,
                              LR schedule, model layout), which rank wrote which rank file, config
        rank_00000.pt         per-rank parts: data-loader position, carried recurrent state, RNG
        ds/mp_rank_00_model_states.pt                       DeepSpeed: model (one per TP x PP rank)
        ds/zero_pp_rank_0_mp_rank_00_optim_states.pt        DeepSpeed: ZeRO shard (per DP x MP rank)
        zero_to_fp32.py       DeepSpeed's recovery script
    .tmp-step_0000012/        a save in progress (never read; removed by the next trainer's start)
    rejected/step_0000014/    a checkpoint that failed verification when a trainer resumed (kept)

Nothing here needs a process group: the trainer calls it from rank 0, the exporter offline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megaret import faults
from megaret.errors import UserError

log = logging.getLogger("megaret.checkpoint")
MANIFEST = "manifest.json"
LATEST = "latest"
#: the manifest's "format": 2 = one state per part (megaret.checkpoint.manager); 1 = before it
#: (megaret.checkpoint.legacy). A newer one is refused: it needs a newer megaret.
FORMAT_VERSION = 2
_STEP_RE = re.compile(r"^step_(\d{7,})$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, corrupt, partial or incompatible with this run."""


class FormatError(CheckpointError):
    """A checkpoint written by a newer megaret (its format is unknown here): never skipped over."""


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str) -> None:
    """Write text to `path` so readers see either the old or the whole new content."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def hash_tree(root: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, size}} of every file under root except the manifest; fsyncs each."""
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            fsync_path(p)
            files[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    for d in sorted({p.parent for p in root.rglob("*")} | {root}):
        fsync_path(d)
    return files


def publish(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest into the finished temporary directory and rename it to `final`.

    An existing `final` (a checkpoint of the same step from an earlier attempt) is moved aside
    first and removed only after the new one is in place; `latest` is updated last.
    """
    manifest = dict(manifest, files=hash_tree(tmp))
    write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=False))
    faults.point("before_publish")  # a test may end the process here, every file written
    trash = None
    if final.exists():
        trash = final.with_name(f".old-{final.name}")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(final, trash)
    os.replace(tmp, final)
    fsync_path(final.parent)
    try:  # a hint for people and tools: readers walk the step directories, not this file
        write_atomic(final.parent / LATEST, final.name + "\n")
    except OSError as exc:
        log.warning("%s was published but %s could not be updated: %s", final, final.parent / LATEST, exc)
    if trash is not None:
        shutil.rmtree(trash)


def recover(root: Path) -> list[str]:
    """Tidy up after writers that died (call at start, before any save): drop unpublished
    ``.tmp-*`` directories; put back a checkpoint moved aside (``.old-*``) whose replacement
    never arrived. Returns what was done."""
    done = []
    if not root.is_dir():
        return done
    for p in sorted(root.iterdir()):
        if p.name.startswith(".tmp-") and p.is_dir():
            shutil.rmtree(p)
            done.append(f"removed the unfinished save {p}")
        elif p.name.startswith(".old-") and p.is_dir():
            final = root / p.name[len(".old-"):]
            if final.exists():
                shutil.rmtree(p)
            else:
                os.replace(p, final)
                done.append(f"restored {final} (its replacement was never published)")
    return done


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Published checkpoint directories under root, oldest first."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_manifest(ckpt: Path) -> dict[str, Any]:
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is partial (an interrupted save?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path} has no 'files' table")
    fmt = manifest.get("format", 1)
    if not isinstance(fmt, int) or fmt < 1:
        raise CheckpointError(f"{path} has format {fmt!r}, which no megaret writes")
    if fmt > FORMAT_VERSION:
        raise FormatError(f"{path} is checkpoint format {fmt}, newer than this megaret reads (1 to "
                          f"{FORMAT_VERSION}): upgrade megaret to load it")
    return manifest


def verify(ckpt: Path) -> dict[str, Any]:
    """The manifest of `ckpt` after checking every listed file's size and sha256.

    Raises CheckpointError naming the first bad file.
    """
    manifest = read_manifest(ckpt)
    for rel, want in manifest["files"].items():
        path = ckpt / rel
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {ckpt / MANIFEST})")
        size = path.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{path} has {size} bytes, the manifest says {want['size']} (truncated?)")
        digest = sha256_file(path)
        if digest != want["sha256"]:
            raise CheckpointError(f"{path} has sha256 {digest[:16]}..., the manifest says "
                                  f"{want['sha256'][:16]}... (its bytes changed)")
    return manifest


@dataclass
class Selection:
    path: Path | None  # the newest checkpoint that verifies; None when there is none
    manifest: dict[str, Any] | None
    messages: list[str]  # one line per rejected checkpoint, then which one is used
    rejected: list[tuple[Path, str]] = field(default_factory=list)  # (checkpoint, why), newest first

    def fallback_warning(self) -> str | None:
        """One line saying that newer checkpoints failed verification and an older one is used."""
        if not self.rejected or self.path is None:
            return None
        why = "; ".join(f"{p.name}: {reason}" for p, reason in self.rejected)
        return (f"megaret: warning: using the older checkpoint {self.path} because newer ones failed "
                f"verification ({why})")


def select_newest_valid(root: Path, attempts: int = 3) -> Selection:
    """Walk the checkpoints newest first; the first that verifies is used, each one skipped is
    reported. A checkpoint of a newer format stops the walk (`FormatError`).

    A checkpoint that disappears while it is read (a live run pruned it) is not a rejection: the
    walk starts over on a fresh listing (up to `attempts` times)."""
    for attempt in range(attempts):
        messages, rejected, vanished = [], [], False
        for _, ckpt in reversed(list_checkpoints(root)):
            try:
                manifest = verify(ckpt)
            except FormatError:
                raise  # falling back would train on from an older step and overwrite the newer ones
            except CheckpointError as exc:
                if not ckpt.exists() and attempt + 1 < attempts:
                    vanished = True
                    break
                rejected.append((ckpt, str(exc)))
                messages.append(f"checkpoint {ckpt.name} is unusable: {exc}")
                continue
            if rejected:
                messages.append(f"resuming from the previous checkpoint {ckpt.name} instead of "
                                f"{', '.join(p.name for p, _ in rejected)}")
            return Selection(ckpt, manifest, messages, rejected)
        if not vanished:
            break
    if rejected:
        messages.append(f"no usable checkpoint in {root} ({', '.join(p.name for p, _ in rejected)} rejected)")
    return Selection(None, None, messages, rejected)


REJECTED = "rejected"  # run.dir/checkpoints/rejected/: checkpoints that failed verification at resume


def reject(ckpt: Path) -> Path:
    """Move a checkpoint that failed verification to ``<root>/rejected/`` (never deleted: it may be
    the last copy of a state someone can repair); returns where it went."""
    dest_dir = ckpt.parent / REJECTED
    dest_dir.mkdir(exist_ok=True)
    dest, n = dest_dir / ckpt.name, 1
    while dest.exists():
        dest, n = dest_dir / f"{ckpt.name}.{n}", n + 1
    os.replace(ckpt, dest)
    fsync_path(ckpt.parent)
    return dest


def rejected_checkpoints(root: Path) -> list[Path]:
    """What `reject` moved aside under root (earlier resumes)."""
    d = Path(root) / REJECTED
    return sorted(d.iterdir()) if d.is_dir() else []


def resolve(path: Path) -> Path:
    """A checkpoint directory from a step directory, a checkpoints/ root or a run directory
    (the newest valid checkpoint of the latter two). Falling back past newer checkpoints that
    fail verification is said in one warning line (on stderr when logging is not set up)."""
    path = Path(path)
    if (path / MANIFEST).is_file() or _STEP_RE.match(path.name):
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    sel = select_newest_valid(root)
    if sel.path is None:
        raise CheckpointError(f"no valid checkpoint under {path}" + "".join(f"; {m}" for m in sel.messages))
    if (warning := sel.fallback_warning()) is not None:
        log.warning(warning)
    return sel.path


def to_prune(steps: list[int], keep_last: int, keep_every: int | None) -> list[int]:
    """Steps to delete: all but the newest `keep_last` and the multiples of `keep_every`."""
    keep = set(sorted(steps)[-keep_last:]) if keep_last > 0 else set()
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    return sorted(s for s in steps if s not in keep)


def prune(root: Path, keep_last: int, keep_every: int | None, newest: int) -> list[Path]:
    """Apply the keep policy to the checkpoints up to step `newest` (the one just saved, always
    kept). Later ones are left alone (a trainer moves those that fail verification to rejected/)."""
    ckpts = {s: p for s, p in list_checkpoints(root) if s <= newest}
    removed = []
    for s in to_prune(list(ckpts), keep_last, keep_every):
        shutil.rmtree(ckpts[s])
        removed.append(ckpts[s])
    return removed
