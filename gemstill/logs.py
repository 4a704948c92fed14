"""Terminal logging for `gemstill run`: a failing stage is one line on the terminal, while every record, with
its traceback, still reaches the run's log file and every other handler (Prefect's API log)."""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path


class _WithoutTraceback(logging.Formatter):
    """Formats like `inner`, leaving out tracebacks (they are in the log file)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text:
            record = copy.copy(record)  # the other handlers still see the traceback
            record.exc_info, record.exc_text = None, None
        return self.inner.format(record)


def quiet_tracebacks(log_file: Path) -> Path:
    """Wrap the formatter of every terminal handler on the root and Prefect loggers (idempotent), and log every
    record, tracebacks included, to `log_file`."""
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in logging.root.manager.loggerDict if "prefect" in n)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            is_terminal = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            if is_terminal and not isinstance(handler.formatter, _WithoutTraceback):
                handler.setFormatter(_WithoutTraceback(handler.formatter))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(to_file)
    return log_file


def _until_interrupted(record: logging.LogRecord) -> bool:
    from gemstill import interrupt

    return interrupt.received() is None


RUN_LOGGER = "gemstill.run"  # one line per stage as it ends: the flow writes it, `gemstill run` shows it


def run_terminal(log_file: Path) -> Path:
    """The terminal of `gemstill run`: the one line per stage of the `gemstill.run` logger, warnings and errors
    (without tracebacks), and the progress bars; everything else (every Prefect and stage log record, at INFO,
    tracebacks included) goes to `log_file` only."""
    quiet_tracebacks(log_file)
    for handler in logging.getLogger().handlers:
        is_terminal = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if is_terminal:
            handler.setLevel(max(handler.level, logging.WARNING))
            handler.addFilter(_until_interrupted)  # after a Ctrl-C, the run's own one line says what happened
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.INFO)
    prefect = logging.getLogger("prefect")
    if prefect.getEffectiveLevel() > logging.INFO:  # PREFECT_LOGGING_LEVEL quietens the terminal, not the file
        prefect.setLevel(logging.INFO)
    progress = logging.getLogger(RUN_LOGGER)
    progress.setLevel(logging.INFO)
    if not any(getattr(h, "gemstill_run", False) for h in progress.handlers):
        terminal = logging.StreamHandler(sys.stdout)
        terminal.setFormatter(logging.Formatter("%(message)s"))
        terminal.gemstill_run = True  # type: ignore[attr-defined]
        progress.addHandler(terminal)
    return log_file
