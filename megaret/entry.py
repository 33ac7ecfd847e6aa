"""How every entry point ends: one line for an error the user can fix, the exit-code table.

``run_entry(body)`` runs an entry point's body. A :class:`~megaret.errors.UserError` becomes one
line ``megaret: error: <why and the fix>`` on stderr and exit status 2 (with ``MEGARET_DEBUG=1``
the traceback is printed first); any other exception is a bug and keeps its traceback (exit 1).
Every rank that raises prints its own line, so a multi-rank failure is visible from each log.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

from megaret.errors import ERROR_PREFIX, EXIT_USER, UserError

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
    print(error_line(exc), file=sys.stderr, flush=True)


def run_entry(body: Callable[[], T], cleanup: Callable[[], None] | None = None) -> T:
    """``body()``; a UserError is reported in one line and becomes ``SystemExit(2)``; ``cleanup``
    runs in every case (e.g. leaving the process group)."""
    try:
        return body()
    except UserError as exc:
        report_user_error(exc)
        raise SystemExit(EXIT_USER) from None
    finally:
        if cleanup is not None:
            cleanup()
