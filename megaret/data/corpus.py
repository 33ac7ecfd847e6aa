"""Text sources: documents with provenance, and the held-out validation split by document.

A *source* is one input path: a ``.txt``/``.md``/``.py`` file (one document), a ``.jsonl`` file
(one document per line, text under ``text_key``), or a folder of such files (walked in sorted
order, so builds are reproducible). In a folder, files of other suffixes are skipped and counted
(:class:`Skipped`). A text file holding a NUL byte or more than :data:`MAX_UNDECODABLE` of bytes
that are not UTF-8 is binary: refused (``on_binary="error"``, a DataError naming it) or skipped
and counted (``on_binary="skip"``). Each :class:`Document` carries a stable ``key`` (source name +
relative path [+ line]) from which the validation split is derived by hashing: a document is in the
validation split independently of which other documents exist, so adding data never moves an old
document between splits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from megaret.data.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
JSONL_SUFFIXES = (".jsonl", ".json")
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
            yield from iter_path(self.path, self.name, text_key, on_binary, skipped)


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


def _read_text(path: Path, on_binary: str, rel: str, skipped: Skipped | None) -> str | None:
    """The file's text (the few bytes that are not UTF-8 replaced), or None for a skipped binary."""
    data = path.read_bytes()
    why = binary_reason(data)
    if why is None:
        return data.decode("utf-8", errors="replace")
    if on_binary == "error":
        raise DataError(
            f"input {path} is not text ({why.removeprefix('binary: ')}); remove it from the input "
            "or pass --on-binary skip to skip and count such files"
        )
    if skipped is not None:
        skipped.add(rel, "binary")
    return None


def _iter_jsonl(path: Path, name: str, rel: str, text_key: str) -> Iterator[Document]:
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_key]
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(
                    f"{path}:{lineno}: not a JSON object with a string {text_key!r} field ({exc}); "
                    "fix the line or pass --text-key"
                ) from exc
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {text_key!r} is {type(text).__name__}, not a string")
            if text:
                yield Document(f"{name}/{rel}:{lineno}", text, name)


def iter_path(
    path: str | Path,
    name: str | None = None,
    text_key: str = "text",
    on_binary: str = "error",
    skipped: Skipped | None = None,
) -> Iterator[Document]:
    """Documents of a text file, a JSON-lines file or a folder of them (sorted, recursive).

    Files a folder holds of other suffixes, and binary files under ``on_binary="skip"``, are
    recorded in ``skipped``.
    """
    if on_binary not in ON_BINARY:
        raise DataError(f"on_binary={on_binary!r} is not one of {', '.join(ON_BINARY)}")
    p = Path(path)
    name = name or p.name
    if not p.exists():
        raise DataError(f"input {p} does not exist; pass a folder of .txt files or a .jsonl file")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    found = False
    for f in files:
        rel = f.name if f == p else f.relative_to(p).as_posix()
        if f.suffix in JSONL_SUFFIXES:
            found = True
            yield from _iter_jsonl(f, name, rel, text_key)
        elif f.suffix in TEXT_SUFFIXES or f == p:
            found = True
            text = _read_text(f, on_binary, rel, skipped)
            if text:
                yield Document(f"{name}/{rel}", text, name)
        elif skipped is not None:
            skipped.add(rel, f"unsupported suffix {f.suffix or '(none)'}")
    if not found:
        raise DataError(f"input {p} holds no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")


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
