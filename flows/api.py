"""The Prefect API a `gemstill run` or `gemstill eval nightly` talks to: the one PREFECT_API_URL names, else a
temporary server of its own, started here so that it outlives a Ctrl-C.

Prefect starts its temporary server on first use, as a child in the terminal's process group: a Ctrl-C killed it
with gemstill, and the flow then retried against the dead API for minutes. Started here with SIGINT blocked (a
child inherits the mask), it ignores the terminal's Ctrl-C; gemstill stops it when it is done or interrupted
(gemstill.interrupt's cleanups), with the SIGTERM Prefect's own stop sends.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

from gemstill import interrupt

STARTUP_SECONDS = 120  # Prefect's default (20 s) is too short on two busy cores


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """Within: Prefect clients reach PREFECT_API_URL, or this process's temporary server, stopped on exit."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield
        return
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry from a temporary API
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's clients use when no API URL is set

    def stop() -> None:
        _drain(seconds=2.0)  # the log records and events still queued reach the server before it stops
        server.stop()

    forget = interrupt.on_exit(stop)  # an interrupt (during start-up too) stops it
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        server.start(timeout=STARTUP_SECONDS)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    try:
        yield
    finally:
        forget()
        stop()


def _drain(seconds: float) -> None:
    """Send what Prefect's log and event workers still hold (at exit they would retry a stopped server for a
    minute)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=seconds)
