"""Terminal logging for `gemstill run`: a failing stage is one line on the terminal, while every record, with
its traceback, still reaches the run's log file and every other handler (Prefect's API log)."""

from __future__ import annotations

import copy
import logging
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
