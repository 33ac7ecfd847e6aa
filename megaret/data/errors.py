"""The one exception type of the data pipeline.

Every data failure the user can fix (missing shard, checksum mismatch, tokenizer mismatch, unreadable
input) is a :class:`DataError` with a one-line message naming the file and the fix, so the trainer
can report it without a traceback hunt.
"""

from __future__ import annotations


class DataError(RuntimeError):
    """A data file is missing, corrupt or inconsistent with its manifest (one-line message)."""
