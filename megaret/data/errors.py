"""The one exception type of the data pipeline, and the check that a named file exists.

Every data failure the user can fix (missing shard, checksum mismatch, tokenizer mismatch, unreadable
input) is a :class:`DataError` with a one-line message naming the file and the fix, so the trainer
can report it without a traceback hunt.
"""

from __future__ import annotations

from pathlib import Path

from megaret.errors import UserError


class DataError(UserError, RuntimeError):
    """A data file is missing, corrupt or inconsistent with its manifest (one-line message)."""


def existing_file(path: str | Path, default_name: str, what: str, fix: str) -> Path:
    """``path``, or ``path/default_name`` when it is a directory, if that file exists.

    Otherwise a DataError "<what> <file> does not exist; <fix>".
    """
    p = Path(path)
    if p.is_dir():
        p = p / default_name
    if not p.is_file():
        raise DataError(f"{what} {p} does not exist; {fix}")
    return p
