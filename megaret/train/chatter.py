"""Third-party chatter off the console, into run.dir/logs/third_party-rank{N}.log.

DeepSpeed logs to stdout through a handler of its own ("Setting accelerator to CPU", ...);
megatron-core and torch warn through Python's `warnings` (CUDA_DEVICE_MAX_CONNECTIONS, ...). On
the console they bury megaret's own lines. `ThirdPartyLog`, entered by the trainer's entry point
before DeepSpeed is imported, diverts them: the records wait in memory until the run's directory
is known to be writable (`attach`), then go to this rank's log file. megaret's own output (its
prints, the ``megaret.*`` loggers, warnings raised from megaret's code) stays on the console.
With MEGARET_DEBUG=1 nothing is diverted.

Entry points without a run directory (generate, evaluate, export) use `quiet_third_party()`: the
same loggers, never attached to a file: their errors go to stderr, the rest (DeepSpeed's "Setting
accelerator to CPU" warning at import, ...) is dropped, and stdout keeps only the command's output.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import megaret
from megaret.config import ConfigError
from megaret.entry import debug_enabled

#: loggers whose records leave the console ("DeepSpeed" adds its own stdout handler on import)
DIVERTED_LOGGERS = ("DeepSpeed", "megatron")
_MEGARET_DIR = str(Path(megaret.__file__).resolve().parent)


class ThirdPartyLog(logging.Handler):
    """Context manager and logging handler: diverted records, buffered until `attach`."""

    def __init__(self, console_level: int | None = None) -> None:
        """console_level: a log never attached (`quiet_third_party`): records at this level or above
        go to stderr, the others are dropped, and Python warnings are left as they are (stderr)."""
        super().__init__()
        self.console_level = console_level
        self.console: logging.Handler | None = None
        self.active = False
        self.pending: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None
        self.path: Path | None = None
        self._show_warning: Any = None
        self._propagate: dict[str, bool] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.handle(record)
        elif self.console is not None:
            if record.levelno >= self.console_level:
                self.console.handle(record)
        else:
            self.pending.append(record)

    def _swallow(self, record: logging.LogRecord) -> bool:
        self.handle(record)
        return False  # not to the logger's own (console) handlers

    def _warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        if str(filename).startswith(_MEGARET_DIR):  # megaret's own warnings stay on the console
            self._show_warning(message, category, filename, lineno, file, line)
            return
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        self.handle(logging.LogRecord("py.warnings", logging.WARNING, str(filename), lineno, text, None,
                                      None))

    def __enter__(self) -> ThirdPartyLog:
        if debug_enabled():
            return self
        self.active = True
        if self.console_level is not None:
            self.console = logging.StreamHandler(sys.stderr)
            self.console.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        for name in DIVERTED_LOGGERS:
            logger = logging.getLogger(name)
            logger.addFilter(self._swallow)  # records logged on it: DeepSpeed's
            logger.addHandler(self)  # records of its children, e.g. megatron.core.*
            self._propagate[name], logger.propagate = logger.propagate, False
        if self.console_level is None:
            self._show_warning, warnings.showwarning = warnings.showwarning, self._warning
        return self

    def attach(self, log_dir: Path, rank: int) -> None:
        """Write what was held, and from now on every diverted record, to
        log_dir/third_party-rank{rank}.log."""
        if not self.active or self.console_level is not None:  # MEGARET_DEBUG, or a console-only log
            return
        self.path = Path(log_dir) / f"third_party-rank{rank}.log"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = logging.FileHandler(self.path, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot write the log {self.path} ({exc.strerror or exc}); set run.dir to a "
                              "directory this job can write") from exc
        self.file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for record in self.pending:
            self.file.handle(record)
        self.pending = []

    def __exit__(self, *exc: Any) -> None:
        if not self.active:
            return
        self.active = False
        if self._show_warning is not None:
            warnings.showwarning, self._show_warning = self._show_warning, None
        for name, propagate in self._propagate.items():
            logger = logging.getLogger(name)
            logger.removeFilter(self._swallow)
            logger.removeHandler(self)
            logger.propagate = propagate
        if self.file is not None:
            self.file.close()


def quiet_third_party() -> ThirdPartyLog:
    """For entry points without a run directory: third-party loggers' errors to stderr, the rest
    dropped (a context manager; MEGARET_DEBUG=1 keeps everything)."""
    return ThirdPartyLog(console_level=logging.ERROR)
