"""Reading verified shards: indexed access to any sample of a split through ``pread``.

A :class:`ShardSet` is what :func:`~megaret.data.shards.verify.open_split` returns: the shards of
one split that passed verification, numbered in two coordinate systems (all shards, as the
manifest's ``doc_table`` counts them, and usable shards only, as the packed loader samples them).

Shards are read with ``os.pread``, not through a memory map: a file truncated under a map kills
the process with SIGBUS at the next touch of a lost page, which Python cannot catch. Every sample
read also compares the open file's ``fstat`` with the identity recorded when the shard was
verified (size, mtime, inode, device; ~1 µs), so a shard that shrinks or is rewritten under a
running job is a :class:`DataError` naming it.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megaret.data.errors import DataError


@dataclass
class ShardInfo:
    name: str
    location: str  # where the manifest says it is
    local: str | None  # verified local file (None: skipped as corrupt)
    samples: int
    sha256: str
    size: int | None = None  # bytes, as the manifest records
    max_id: int | None = None  # the largest token id in it (None: a manifest from before it was recorded)
    identity: tuple[int, int, int, int] | None = None  # (size, mtime_ns, inode, device) when verified


@dataclass
class ShardSet:
    """The verified shards of one split of one manifest, with indexed sample access."""

    manifest: dict[str, Any]
    location: str
    split: str
    shards: list[ShardInfo]
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        counts = np.array([s.samples for s in self.shards], dtype=np.int64)
        self._orig_cum = np.concatenate([[0], np.cumsum(counts)])  # over all shards (doc_table coordinates)
        self.usable = [i for i, s in enumerate(self.shards) if s.local is not None]
        ucounts = counts[self.usable] if self.usable else np.zeros(0, dtype=np.int64)
        self._usable_cum = np.concatenate([[0], np.cumsum(ucounts)])
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.sample_tokens = int(self.manifest["sample_tokens"])
        self._open: OrderedDict[int, Any] = OrderedDict()

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    @property
    def num_samples(self) -> int:
        """Samples in the usable (verified) shards."""
        return int(self._usable_cum[-1])

    def doc_table(self) -> list[tuple[int, int]]:
        """(first sample in all-shard coordinates, segments) of each document whose shards are all usable."""
        table = self.manifest["splits"][self.split].get("doc_table")
        if table is None:
            raise DataError(
                f"manifest {self.location} was built in {self.mode!r} mode; stateful loading needs "
                "shards built with --mode segments"
            )
        ok = np.zeros(len(self.shards), dtype=bool)
        ok[self.usable] = True
        out = []
        for first, n in table:
            s0 = int(np.searchsorted(self._orig_cum, first, side="right") - 1)
            s1 = int(np.searchsorted(self._orig_cum, first + n - 1, side="right") - 1)
            if ok[s0 : s1 + 1].all():
                out.append((int(first), int(n)))
        return out

    def _file(self, shard: int) -> _ShardFile:
        f = self._open.get(shard)
        if f is None:
            f = _ShardFile(self.shards[shard])
            self._open[shard] = f
            if len(self._open) > 64:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(shard)
        return f

    def _read(self, shard: int, local: int) -> tuple[np.ndarray, dict[str, Any]]:
        key = f"{int(self._orig_cum[shard]) + local:09d}"  # keys number samples across the split's shards
        tok, meta = self._file(shard).read(key + ".tok", key + ".json")
        tokens = np.frombuffer(tok, dtype=self.dtype)  # (sample_tokens,)
        if tokens.shape[0] != self.sample_tokens:
            raise DataError(
                f"shard {self.shards[shard].local} sample {key} has {tokens.shape[0]} tokens, "
                f"the manifest says {self.sample_tokens}; rebuild it"
            )
        return tokens, json.loads(meta)

    def read_usable(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Sample ``index`` of the usable-sample space [0, num_samples)."""
        u = int(np.searchsorted(self._usable_cum, index, side="right") - 1)
        return self._read(self.usable[u], index - int(self._usable_cum[u]))

    def read_global(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Sample ``index`` in all-shard coordinates (the doc_table's)."""
        s = int(np.searchsorted(self._orig_cum, index, side="right") - 1)
        return self._read(s, index - int(self._orig_cum[s]))

    def close(self) -> None:
        for tar in self._open.values():
            tar.close()
        self._open.clear()

    def __getstate__(self) -> dict[str, Any]:  # open files do not travel to loader workers
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state


class _ShardFile:
    """One open shard: the member offsets of its uncompressed tar, members read with pread."""

    def __init__(self, info: ShardInfo) -> None:
        self.path = str(info.local)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise DataError(
                f"shard {self.path} cannot be opened ({exc}); restore it or rebuild the shards"
            ) from exc
        try:
            self.identity = _identity(os.fstat(self.fd))
            if info.identity is not None and self.identity != info.identity:
                raise self._changed(self.identity, info.identity, "since it was verified")
            if info.size is not None and self.identity[0] != info.size:
                raise self._changed(self.identity, (info.size,), "from its manifest size")
            self.members = self._index()
        except BaseException:
            os.close(self.fd)
            raise

    def _changed(self, now: tuple[int, ...], expected: tuple[int, ...], when: str) -> DataError:
        size, was = now[0], expected[0]
        what = f"now {size} bytes, was {was}" if size != was else "rewritten: its mtime or inode differs"
        return DataError(
            f"shard {self.path} changed {when} ({what}); restore it and restart (the shard is verified "
            "again), or rebuild the shards"
        )

    def _index(self) -> dict[str, tuple[int, int]]:
        """{member name: (data offset, size)} from the 512-byte headers (ustar, no extensions)."""
        members, off, end = {}, 0, self.identity[0]
        while off + 512 <= end:
            header = os.pread(self.fd, 512, off)
            if len(header) < 512 or header[0] == 0:  # the end-of-archive blocks
                break
            try:
                name = header[:100].split(b"\0", 1)[0].decode()
                size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            except ValueError as exc:
                raise DataError(
                    f"shard {self.path} is not a tar (bad header at byte {off}); rebuild it"
                ) from exc
            if header[156:157] in (b"0", b"\0"):
                members[name] = (off + 512, size)
            off += 512 + (size + 511) // 512 * 512
        return members

    def read(self, *names: str) -> list[bytes]:
        """The named members' bytes; the file must still be the one that was opened."""
        now = _identity(os.fstat(self.fd))
        if now != self.identity:
            raise self._changed(now, self.identity, "while in use")
        out = []
        for name in names:
            try:
                off, size = self.members[name]
            except KeyError as exc:
                raise DataError(f"shard {self.path} lacks member {name}; rebuild it") from exc
            data = os.pread(self.fd, size, off)
            if len(data) != size:
                raise DataError(
                    f"shard {self.path} changed while in use (member {name} is cut short); restore it "
                    "and restart, or rebuild the shards"
                )
            out.append(data)
        return out

    def close(self) -> None:
        os.close(self.fd)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def iter_manifest_tokens(sets: Iterable[ShardSet]) -> Iterator[np.ndarray]:
    """Every usable sample's tokens, in order (for tools and checks, not training)."""
    for s in sets:
        for i in range(s.num_samples):
            yield s.read_usable(i)[0]
