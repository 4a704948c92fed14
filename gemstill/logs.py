"""Terminal logging for the CLI: a stage that fails on bad input (a GemstillError) is one line on the terminal,
while its traceback still reaches every other handler (Prefect's API log, files)."""

from __future__ import annotations

import copy
import logging

from gemstill.errors import GemstillError


class _WithoutUserErrorTraceback(logging.Formatter):
    """Formats like `inner`, leaving out the traceback of a GemstillError (its message says all a user needs)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and isinstance(record.exc_info[1], GemstillError):
            record = copy.copy(record)  # the other handlers still see the traceback
            record.exc_info, record.exc_text = None, None
        return self.inner.format(record)


def quiet_user_errors() -> None:
    """Wrap the formatter of every terminal handler on the root and Prefect loggers (idempotent)."""
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in logging.root.manager.loggerDict if "prefect" in n)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            is_terminal = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            if is_terminal and not isinstance(handler.formatter, _WithoutUserErrorTraceback):
                handler.setFormatter(_WithoutUserErrorTraceback(handler.formatter))
