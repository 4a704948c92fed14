"""Ctrl-C (SIGINT) and SIGTERM for the long commands: they stop promptly, whatever the process is doing.

Python's own SIGINT handler raises KeyboardInterrupt wherever the main thread happens to be, and a raise inside a
garbage-collection callback (JAX registers some) is discarded: the run went on and committed. Here a signal is
first recorded, so code that polls `received()` (the stage watchdog, the `gemstill run` loop) sees it whatever
else happens, and only then raised as `Interrupted` in the main thread. A timer started by the first signal makes
sure of the rest: if the process is still there `grace_seconds` later (a thread stuck in a long native call, a
discarded raise), it runs the registered cleanups (leases released, the embedded server stopped), prints the
command's one-line message and exits with 128 + the signal's number. A second signal exits at once the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_SECONDS = 5.0


class Interrupted(BaseException):
    """The command was sent SIGINT or SIGTERM. A BaseException, so `except Exception` in library code lets it by."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_received: int | None = None
_cleanups: list[Callable[[], None]] = []
_message: list[Callable[[int], str]] = [lambda signum: f"interrupted ({signal.Signals(signum).name})"]
_lock = threading.Lock()


def received() -> int | None:
    """The signal this process was sent (SIGINT or SIGTERM), or None."""
    return _received


def check() -> None:
    """Raise Interrupted if a signal came (what long loops in any thread call between their steps)."""
    if _received is not None:
        raise Interrupted(_received)


def on_exit(cleanup: Callable[[], None]) -> Callable[[], None]:
    """Run `cleanup` before a forced exit (a lease to release, a server to stop); returns a function that forgets
    it again (the work it guarded finished)."""
    with _lock:
        _cleanups.append(cleanup)

    def forget() -> None:
        with _lock:
            if cleanup in _cleanups:
                _cleanups.remove(cleanup)

    return forget


def run_cleanups() -> None:
    """Run (once) every registered cleanup, newest first; a failing one does not stop the others."""
    while True:
        with _lock:
            if not _cleanups:
                return
            cleanup = _cleanups.pop()
        with contextlib.suppress(Exception):
            cleanup()


def message(signum: int) -> str:
    return _message[-1](signum)


def print_error(text: str, fresh_line: bool = False) -> None:
    """Print `error: TEXT` as a line of its own: a progress bar left open (tqdm redraws its line with a carriage
    return, never ending it), or `fresh_line`, starts it on a new line so it is never glued to what came before."""
    from tqdm import tqdm

    open_bars = [bar for bar in list(getattr(tqdm, "_instances", ())) if not getattr(bar, "disable", False)]
    newline = "\n" if fresh_line or open_bars else ""
    print(f"{newline}error: {text}", file=sys.stderr, flush=True)


def exit_now(signum: int) -> None:
    """Run the cleanups, print the command's one-line message and leave with 128 + signum, whatever threads are
    still at work (their partial work is what a rerun resumes from; nothing of theirs is committed)."""
    run_cleanups()
    sys.stdout.flush()
    # on a line of its own: after the terminal's "^C", and after whatever another thread or a child sharing the
    # terminal (Prefect's server, also signalled by a SIGTERM to the group) wrote without ending its line
    print_error(message(signum), fresh_line=True)
    os._exit(128 + signum)


def _after_grace(signum: int, seconds: float) -> None:
    threading.Event().wait(seconds)
    exit_now(signum)


@contextlib.contextmanager
def interruptible(
    describe: Callable[[int], str] | None = None, grace_seconds: float = GRACE_SECONDS, raise_in_main: bool = True
) -> Iterator[None]:
    """Within: SIGINT and SIGTERM are recorded, raised as Interrupted in the main thread (unless `raise_in_main`
    is False: the caller polls `received()`), and the process exits 128 + N at the latest `grace_seconds` later.
    `describe(signum)` gives the one-line message (what is kept, how to resume)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only: whoever owns it handles them
        return

    def handle(signum: int, frame) -> None:
        global _received
        first = _received is None
        _received = signum
        if not first:  # a second Ctrl-C: no more waiting
            exit_now(signum)
        threading.Thread(target=_after_grace, args=(signum, grace_seconds), daemon=True).start()
        if raise_in_main:
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    if describe is not None:
        _message.append(describe)
    try:
        yield
    finally:
        if describe is not None:
            _message.remove(describe)
        for s, handler in previous.items():
            signal.signal(s, handler)
