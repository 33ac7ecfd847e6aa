"""One trainer per run.dir: a lock rank 0 holds for the life of the run.

Two mechanisms, because neither works everywhere:

- ``run.dir/megaret.lock`` is created with O_EXCL (atomic on local disks, NFSv3+ and Lustre) and
  names its holder (host, PID, since when, a random token); a daemon thread touches it (its
  mtime is the heartbeat) every `HEARTBEAT_S` seconds.
- The holder also keeps ``fcntl.flock`` on it. Where flock reaches every client (local disks,
  NFS, Lustre mounted with ``-o flock``) a second trainer sees a live holder for certain, even
  one whose heartbeat is late; elsewhere (Lustre's default: node-local flock) it proves nothing.

A trainer that finds the file decides:

1. flock is held by another: live, refuse.
2. Same host: the PID is gone (or is this process itself: an earlier Trainer it never closed):
   take over at once. The PID lives and the heartbeat is fresh: refuse.
3. Another host: a heartbeat older than `STALE_S` is stale: take over. A fresh one is watched
   (by this host's clock, so clock skew between nodes does not matter) until it moves (live:
   refuse) or stays still for `STALE_S` (dead: take over).

Taking over goes through a short-lived ``megaret.lock.takeover`` guard (O_EXCL), so two
trainers that both judge the lock stale cannot both win. The refusal is one line naming the
holder and the fix, raised on every rank (rank 0 decides and broadcasts). The lock is released
by `RunLock.release` (Trainer.close) and, failing that, when the process exits.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megaret.errors import UserError

log = logging.getLogger("megaret.train")

LOCK_FILE = "megaret.lock"
HEARTBEAT_S = 5.0  # the holder touches the lock file this often
STALE_S = 20.0  # a heartbeat this old (4 missed beats) is a dead holder's


class RunLockError(UserError, RuntimeError):
    """run.dir is in use by another trainer (or cannot hold a lock file)."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    since: float
    token: str

    @classmethod
    def read(cls, path: Path) -> Holder | None:
        """The holder a lock file names; None when it is gone. An unreadable (half-written) file
        is a holder nobody knows: its heartbeat alone decides."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(str(raw["host"]), int(raw["pid"]), float(raw["since"]), str(raw["token"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return cls("?", -1, 0.0, "?")

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since)) if self.since else "?"
        return f"host {self.host}, PID {self.pid}, since {since}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _flock_held(path: Path) -> bool:
    """True when another open file holds flock on `path` (False also where flock is unsupported)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # ENOLCK / EOPNOTSUPP: no flock on this file system
        return False
    finally:
        os.close(fd)  # also drops the probe's own lock
    return False


_HELD: dict[str, RunLock] = {}  # the locks this process holds, by lock file path


class RunLock:
    """The lock on one run.dir, held by this process (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike[str], heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.me = Holder(socket.gethostname(), os.getpid(), time.time(), uuid.uuid4().hex)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    # -- taking it -------------------------------------------------------------------------

    def acquire(self) -> RunLock:
        """Take the lock or raise RunLockError naming its holder and the fix."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunLockError(f"run.dir={self.run_dir} is not writable ({exc.strerror}: {exc.filename}); "
                               "set run.dir to a directory this job can write") from None
        earlier = _HELD.get(str(self.path))
        if earlier is not None:  # an earlier Trainer of this process that was never closed
            earlier.release()
        for _ in range(20):
            if self._create():
                break
            holder = Holder.read(self.path)
            if holder is None:
                continue  # released meanwhile: try again
            if not self._holder_is_dead(holder):
                raise RunLockError(self._refusal(holder))
            log.warning("taking over the lock of run.dir %s from a dead trainer (%s)", self.run_dir,
                        holder.describe())
            if self._take_over(holder):
                break
            time.sleep(0.1)  # another trainer is taking it over right now: look again
        else:
            raise RunLockError(f"could not take the lock file {self.path}: other trainers keep taking it; "
                               "make sure only one trainer uses this run.dir")
        _HELD[str(self.path)] = self
        atexit.register(self.release)
        self._thread = threading.Thread(target=self._beat, name="megaret-run-lock", daemon=True)
        self._thread.start()
        return self

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise RunLockError(f"cannot create the lock file {self.path}: {exc.strerror}; run.dir must be a "
                               "writable directory") from None
        try:
            os.write(fd, json.dumps({"host": self.me.host, "pid": self.me.pid, "since": self.me.since,
                                     "token": self.me.token}).encode())
            os.fsync(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                os.unlink(self.path)
                raise
        self._fd = fd
        return True

    def _holder_is_dead(self, holder: Holder) -> bool:
        if _flock_held(self.path):
            return False
        if holder.host == self.me.host and holder.pid > 0:
            if holder.pid == self.me.pid:  # not in _HELD: a dead process whose PID this one reuses
                return True
            if not _pid_alive(holder.pid):
                return True
        beat = _mtime(self.path)
        if beat is None:
            return False  # gone meanwhile: the caller looks again
        if time.time() - beat > self.stale_s:
            return True
        if holder.host == self.me.host:
            return False  # a live PID with a fresh heartbeat
        # another host: watch the heartbeat, by this host's clock only
        deadline = time.monotonic() + self.stale_s
        while time.monotonic() < deadline:
            time.sleep(min(0.5, self.heartbeat_s / 4))
            now = _mtime(self.path)
            if now != beat or Holder.read(self.path) != holder:
                return False  # it beats (or changed hands): live
        return True

    def _take_over(self, seen: Holder) -> bool:
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            gfd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            age = time.time() - (_mtime(guard) or time.time())
            if age > self.stale_s:  # a trainer died taking over
                guard.unlink(missing_ok=True)
            return False
        try:
            if Holder.read(self.path) not in (seen, None):
                return False  # someone else has it now
            self.path.unlink(missing_ok=True)
            return self._create()
        finally:
            os.close(gfd)
            guard.unlink(missing_ok=True)

    def _refusal(self, holder: Holder) -> str:
        beat = _mtime(self.path)
        ago = f"last heartbeat {time.time() - beat:.0f}s ago" if beat is not None else "no heartbeat"
        return (f"run.dir {self.run_dir} is in use by another trainer ({holder.describe()}; {ago}; lock file "
                f"{self.path}): wait for it to finish or stop it, or give this run another run.dir. A lock "
                f"left by a dead trainer is taken over by itself (at once on the same host, after "
                f"{self.stale_s:.0f}s without a heartbeat from another)")

    # -- holding it ------------------------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = Holder.read(self.path)
            if holder is None or holder.token != self.me.token:
                self.lost = True
                who = holder.describe() if holder is not None else "nobody"
                log.error("lost the lock of run.dir %s (now held by %s): another trainer took it over after "
                          "this one's heartbeat stalled; two trainers may now write the same run.dir",
                          self.run_dir, who)
                return
            try:
                os.utime(self.path)
            except OSError as exc:
                log.warning("could not refresh the lock file %s: %s", self.path, exc)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this process's (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.heartbeat_s)
        if self._fd is not None and os.getpid() != self.me.pid:  # a forked child: the parent's lock
            self._fd = None
        if self._fd is not None:
            try:
                holder = Holder.read(self.path)
                if holder is not None and holder.token == self.me.token:
                    self.path.unlink(missing_ok=True)
            finally:
                os.close(self._fd)
                self._fd = None
        if _HELD.get(str(self.path)) is self:
            del _HELD[str(self.path)]
        atexit.unregister(self.release)


def release_held() -> None:
    """Release every run.dir lock this process holds (an entry point's clean-up: a Trainer that
    failed while it was being built never reached its close())."""
    for lock in list(_HELD.values()):
        lock.release()


def hold_run_dir(run_dir: str | os.PathLike[str], ctx: Any) -> RunLock | None:
    """Rank 0 takes the lock of `run_dir` (None on the other ranks); if it cannot, every rank
    stops there (the others quoting rank 0's line: nobody waits for a rank that stopped)."""
    from megaret.parallel.agree import agree_or_raise

    return agree_or_raise(ctx, lambda: RunLock(run_dir).acquire())
