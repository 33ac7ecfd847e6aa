"""The error base class users can fix, and the one table of exit codes every entry point uses.

Library code raises a :class:`UserError` subclass (ConfigError, DataError, CheckpointError, ...)
whose message is one line naming the problem and the fix; only entry points print it (prefixed
``megaret: error:``) and exit with :data:`EXIT_USER`. Anything else is a bug: exit
:data:`EXIT_INTERNAL` with the traceback.

| code | meaning                                                            |
|------|--------------------------------------------------------------------|
| 0    | done (also: nothing left to do, e.g. already trained to train.steps) |
| 1    | internal error (a bug: the traceback is printed)                   |
| 2    | user error (one ``megaret: error:`` line naming the fix)           |
| 75   | stopped on a requeue signal after checkpointing: run it again      |
| 76   | lost a peer (a rank, host or link died mid-run): run it again      |
| 130  | interrupted (SIGINT) after checkpointing; a second one: at once    |
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER = 2
EXIT_REQUEUE = 75  # EX_TEMPFAIL
EXIT_PEER_LOST = 76  # a collective failed because a peer is gone (megaret/parallel/peers.py)
EXIT_INTERRUPTED = 130  # 128 + SIGINT

#: the prefix of the one line an entry point prints for a UserError
ERROR_PREFIX = "megaret: error:"


class UserError(Exception):
    """A problem the user can fix; its message is one line naming the problem and the fix."""


class PeerLost(Exception):
    """A collective failed because a rank, its host or the link to it is gone; the message is one
    line naming the lost peer. Not the user's mistake and not a bug: run the job again (it resumes)."""
