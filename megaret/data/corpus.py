"""Text sources: documents with provenance, and the held-out validation split by document.

A *source* is one input: a file, a folder, a glob or a saved ``datasets`` dataset, read by
:mod:`megaret.data.readers` (text, JSON lines, parquet, Arrow, CSV, each also compressed). In a
folder, files of other suffixes are skipped and counted (:class:`Skipped`). A text file holding a NUL
byte or more than :data:`MAX_UNDECODABLE` of bytes that are not UTF-8 is binary: refused
(``on_binary="error"``, a DataError naming it) or skipped and counted (``on_binary="skip"``).
Each :class:`Document` carries a stable ``key`` (source name + relative path [+ line or row]) from
which the validation split is derived by hashing: a document is in the validation split
independently of which other documents exist, so adding data never moves an old document between
splits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

ON_BINARY = ("error", "skip")
#: a text file with more undecodable bytes than this share (or any NUL byte) is binary
MAX_UNDECODABLE = 0.01


@dataclass
class Skipped:
    """Files of an input that gave no documents on purpose: (relative path, why), in walk order."""

    files: list[tuple[str, str]] = field(default_factory=list)

    def add(self, rel: str, why: str) -> None:
        self.files.append((rel, why))

    def summary(self, limit: int = 10) -> dict[str, object]:
        """For the manifest: the count, per-reason counts and the first ``limit`` "path (why)"."""
        reasons: dict[str, int] = {}
        for _, why in self.files:
            reasons[why] = reasons.get(why, 0) + 1
        return {"count": len(self.files), "reasons": reasons,
                "first": [f"{rel} ({why})" for rel, why in self.files[:limit]]}  # fmt: skip


@dataclass(frozen=True)
class Document:
    """One training document; ``key`` is unique and stable across builds."""

    key: str
    text: str
    source: str


@dataclass
class Source:
    """Provenance of one input: where it came from, under which license, and its documents."""

    name: str
    path: str
    license: str = "unknown (user data)"
    documents: Iterable[Document] | None = None  # None: read from `path`

    def iter_documents(
        self, text_key: str = "text", on_binary: str = "error", skipped: Skipped | None = None
    ) -> Iterator[Document]:
        if self.documents is not None:
            yield from self.documents
        else:
            from megaret.data.readers import read_documents  # readers imports this module

            yield from read_documents(self.path, self.name, text_key, on_binary, skipped)


def binary_reason(data: bytes) -> str | None:
    """Why ``data`` is not text (a NUL byte, too many bytes that are not UTF-8), or None."""
    if b"\0" in data:
        return "binary: holds NUL bytes"
    try:
        data.decode("utf-8")
        return None
    except UnicodeDecodeError:
        bad = len(data) - len(data.decode("utf-8", errors="ignore").encode("utf-8"))
    if bad > MAX_UNDECODABLE * len(data):
        return f"binary: {bad / len(data):.0%} of its bytes are not UTF-8"
    return None

def in_validation(key: str, fraction: float, seed: int = 0) -> bool:
    """Whether document ``key`` is held out: a hash of (seed, key) below ``fraction``."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def split_keys(keys: list[str], fraction: float, seed: int = 0) -> set[str]:
    """The validation keys among ``keys``: hash-selected, but at least one when there are >= 2 docs.

    The fallback (smallest hash) keeps tiny corpora from ending up with an empty validation split.
    """
    val = {k for k in keys if in_validation(k, fraction, seed)}
    if not val and fraction > 0 and len(keys) >= 2:
        val = {min(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).digest())}
    if len(val) == len(keys) and len(keys) >= 2:
        val.discard(max(val, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).digest()))
    return val
