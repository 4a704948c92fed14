"""The Prefect API a `gemstill run` or `gemstill eval nightly` talks to: the one PREFECT_API_URL names, else a
temporary server of its own, started here so that it outlives a Ctrl-C.

Prefect starts its temporary server on first use, as a child in the terminal's process group: a Ctrl-C killed it
with gemstill, and the flow then retried against the dead API for minutes. Started here with SIGINT blocked (a
child inherits the mask), it ignores the terminal's Ctrl-C; gemstill stops it when it is done or interrupted
(gemstill.interrupt's cleanups), with the SIGTERM Prefect's own stop sends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
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
    _send_logs_to_api(True)  # an earlier temporary server in this process turned them off as it stopped

    def stop(interrupted: bool = False) -> None:
        # the log records and events still queued reach the server before it stops (briefly, when interrupted);
        # records logged from now on (a stage thread still at work) are dropped: sent to the stopped server they
        # fail, and Prefect writes "--- Error logging to API ---" onto the terminal, ahead of the command's error
        _send_logs_to_api(False)
        _drain(seconds=0.5 if interrupted else 2.0)
        deadline = time.monotonic() + 2.0  # interrupted as start-up began: the server process is about to exist
        while interrupted and server.server_process is None and starting.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        process = server.server_process
        if interrupted and process is not None:  # an interrupt leaves within seconds: terminate, then kill
            process.terminate()
            try:
                process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                process.kill()
        server.stop()

    forget = interrupt.on_exit(lambda: stop(interrupted=True))  # an interrupt (during start-up too) stops it
    failure: list[BaseException] = []

    def start() -> None:
        # this thread alone blocks SIGINT, and the server it starts inherits that: the main thread still takes a
        # Ctrl-C at once, even while the server is starting
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            server.start(timeout=STARTUP_SECONDS)
        except BaseException as error:
            failure.append(error)

    starting = threading.Thread(target=start, name="prefect api start-up", daemon=True)
    starting.start()
    while starting.is_alive():
        starting.join(0.2)
        interrupt.check()
    if failure:
        forget()
        stop()
        raise failure[0]
    try:
        yield
    finally:
        forget()
        stop()


def _send_logs_to_api(enabled: bool) -> None:
    """Off: log records are dropped instead of sent, and a batch already in flight fails silently (Prefect prints
    "--- Error logging to API ---" only while logging.raiseExceptions is on); for a server about to stop."""
    from prefect.logging.handlers import set_api_log_sink

    set_api_log_sink(None if enabled else lambda record: None)
    logging.raiseExceptions = enabled


def _drain(seconds: float) -> None:
    """Send what Prefect's log and event workers still hold (at exit they would retry a stopped server for a
    minute)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=seconds)
