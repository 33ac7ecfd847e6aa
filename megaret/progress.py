"""Progress of the slow, otherwise silent parts (the first-run corpus build, `megaret.evaluate`).

A tqdm bar on stderr when stderr is a terminal and the process is not under CI (the ``CI``
variable set, as GitHub Actions and most CI services do); a log file, a pipe or CI gets no bar,
only the one final line that every `Progress` prints when it closes, so logs stay clean.
``MEGARET_PROGRESS=1`` forces the bars on, ``MEGARET_PROGRESS=0`` off. stdout is never used:
it belongs to the command's results (generated text, evaluation tables).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any


def bars_enabled(stream: Any = None) -> bool:
    """Whether to draw bars on `stream` (default stderr): MEGARET_PROGRESS, else a TTY outside CI."""
    forced = os.environ.get("MEGARET_PROGRESS", "")
    if forced in ("0", "1"):
        return forced == "1"
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("CI")


class Progress:
    """A bar of `total` units (None: a counter) named `desc`; `close(summary)` ends it with one line
    ``<desc>: <summary> in <seconds> s`` on stderr, bar or not. A context manager closes it
    without a summary (the count and time only), e.g. when the work fails half-way."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it") -> None:
        self.desc, self.unit = desc, unit
        self.count = 0
        self.t0 = time.perf_counter()
        self.stream = sys.stderr  # read at creation, so redirecting stderr (tests) captures it
        self.bar = None
        if bars_enabled(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False,
                            dynamic_ncols=True)
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)

    def set_description(self, desc: str, total: int | None = None) -> None:
        """A new stage of the same work: the bar restarts from 0 under a new name."""
        self.desc, self.count = desc, 0
        if self.bar is not None:
            self.bar.reset(total=total)
            self.bar.set_description(desc)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def close(self, summary: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        what = summary if summary is not None else f"{self.count:,} {self.unit}"
        if what:  # an empty summary: the caller reports instead (e.g. an error line)
            print(f"{self.desc}: {what} in {self.seconds:.1f} s", file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(None if exc_type is None else f"stopped after {self.count:,} {self.unit}")
