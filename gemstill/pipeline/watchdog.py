"""A stage's time limit and its interruption, enforced in whatever thread runs it (a Prefect worker thread
included, where Prefect's own timeout cannot interrupt).

Once `timeout_seconds` have passed, StageTimedOut is raised in that thread at its next report (a log line or a
progress step) and, failing that, at its next Python instruction; when the process is sent SIGINT or SIGTERM
(gemstill.interrupt), Interrupted is raised the same way. A single long native call (an XLA compilation, one
jitted step) finishes first. Partial work stays in the store, uncommitted, so a rerun resumes from it; Prefect
marks a task run that raises a TimeoutError `TimedOut`.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from typing import Any

from gemstill import interrupt

POLL_SECONDS = 0.2


class StageTimedOut(TimeoutError):
    """A stage ran past the timeout_seconds its pipeline gives it."""


def _raise_in(thread_id: int, kind: type[BaseException] | None) -> None:
    """Raise `kind` in the thread at its next Python instruction (None: take back one sent and not yet raised)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(kind) if kind else None)


class Watchdog:
    """`with Watchdog(seconds, what):` around a stage's work, in the thread doing it."""

    def __init__(self, seconds: float | None, what: str, poll_seconds: float = POLL_SECONDS):
        self.seconds = seconds
        self.what = what
        self.poll_seconds = poll_seconds
        self.expired = False
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread_id = 0
        self._timer: threading.Thread | None = None

    def error(self) -> StageTimedOut:
        return StageTimedOut(
            f"{self.what} ran past its timeout of {self.seconds:g} s; its partial work is kept, uncommitted: raise "
            "timeout_seconds in the pipeline, or rerun to resume"
        )

    def check(self) -> None:
        """Raise Interrupted or StageTimedOut if it is time to stop (called at every report the stage makes)."""
        interrupt.check()
        if self.expired:
            raise self.error()

    def reporting(self, report: Callable[[Any], None]) -> Callable[[Any], None]:
        """`report` (a log or progress callback) that first checks whether to stop."""

        def checked(value: Any) -> None:
            self.check()
            report(value)

        return checked

    def __enter__(self) -> Watchdog:
        self._thread_id = threading.get_ident()
        self._timer = threading.Thread(target=self._watch, name=f"watchdog {self.what}", daemon=True)
        self._timer.start()
        return self

    def _watch(self) -> None:
        deadline = None if self.seconds is None else time.monotonic() + float(self.seconds)
        while not self._done.wait(self.poll_seconds):
            if deadline is not None and time.monotonic() >= deadline:
                self.expired = True
            kind = (
                interrupt.Interrupted if interrupt.received() is not None else StageTimedOut if self.expired else None
            )
            if kind is not None:
                with self._lock:  # nudged again every poll until the thread leaves the scope
                    if not self._done.is_set():
                        _raise_in(self._thread_id, kind)

    def __exit__(self, kind, error, traceback) -> bool:
        with self._lock:
            self._done.set()
            _raise_in(self._thread_id, None)  # one sent but not yet raised must not escape the scope
        if self._timer is not None:
            self._timer.join()
        if kind is not None and issubclass(kind, StageTimedOut) and self.expired and str(error) == "":
            raise self.error() from None  # the bare exception sent asynchronously, given its message
        if kind is not None and issubclass(kind, interrupt.Interrupted) and interrupt.received() is not None:
            raise interrupt.Interrupted(interrupt.received()) from None  # with the signal that was sent
        return False
