"""How every entry point ends: one line for an error the user can fix, the exit-code table.

``run_entry(body)`` runs an entry point's body. A :class:`~megaret.errors.UserError` becomes one
line ``megaret: error: <why and the fix>`` on stderr and exit status 2 (with ``MEGARET_DEBUG=1``
the traceback is printed first); any other exception is a bug and keeps its traceback (exit 1).
A :class:`~megaret.errors.PeerLost` (a collective lost a rank, host or link) is one such line too, with
exit status 76. Every rank that raises prints its own line, so a multi-rank failure is visible from each log.
A KeyboardInterrupt (Ctrl-C where nothing else handles it; the trainer's second Ctrl-C) is one
``megaret: interrupted`` line and exit status 130. When the reader of stdout leaves
(``--print-config | head``), the entry point stops quietly with status 0: what was read was printed.
"""

from __future__ import annotations

import os
import select
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

from megaret.errors import (
    ERROR_PREFIX,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PEER_LOST,
    EXIT_USER,
    PeerLost,
    UserError,
)

T = TypeVar("T")


def debug_enabled() -> bool:
    """MEGARET_DEBUG=1: show tracebacks of user errors too."""
    return os.environ.get("MEGARET_DEBUG", "") not in ("", "0")


def error_line(exc: BaseException) -> str:
    """The one line printed for a user error (its message folded onto one line)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{ERROR_PREFIX} {text}"


def report_user_error(exc: BaseException) -> None:
    if debug_enabled():
        traceback.print_exception(exc)
    sys.stderr.write(error_line(exc) + "\n")  # one write: ranks sharing a log never interleave mid-line
    sys.stderr.flush()


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has left (Linux/macOS poll it as POLLERR), so a
    BrokenPipeError from some other pipe or socket is not mistaken for it."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll, or stdout is no file
        return False


def run_entry(body: Callable[[], T], cleanup: Callable[[], None] | None = None) -> T:
    """``body()``; a UserError is reported in one line and becomes ``SystemExit(2)``, a
    KeyboardInterrupt ``SystemExit(130)``; ``cleanup`` runs in every case (e.g. leaving the
    process group)."""
    try:
        return body()
    except UserError as exc:
        report_user_error(exc)
        raise SystemExit(EXIT_USER) from None
    except PeerLost as exc:  # a collective lost a peer: one line naming it, status 76
        report_user_error(exc)
        raise SystemExit(EXIT_PEER_LOST) from None
    except KeyboardInterrupt as exc:
        if debug_enabled():
            traceback.print_exception(exc)
        print(f"megaret: interrupted{': ' + str(exc) if str(exc) else ''}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        if not stdout_reader_gone():
            raise
        # `... | head`: the reader has what it wanted; stdout to /dev/null so the flush at exit is quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(EXIT_OK) from None
    finally:
        if cleanup is not None:
            cleanup()
