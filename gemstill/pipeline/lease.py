"""Leases: one run at a time computes a stage key, across processes and machines that share a store.

A lease is a small JSON file beside the key's directory: its owner (host, pid, a random id), its last heartbeat
and its expiry. The holder rewrites it every ttl/3 seconds from a daemon thread, so a lease whose expiry has
passed was left by a run that died (killed, preempted, frozen) and is taken over. Acquiring is write, wait,
read back: object stores have no exclusive create, and whoever's write survives the settle time holds the lease.
A run that finds a live lease waits for it to be released (or to expire) instead of writing the same files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from gemstill import interrupt
from gemstill.errors import GemstillError

DEFAULT_TTL_S = 120.0  # $GEMSTILL_LEASE_SECONDS overrides it
SETTLE_S = 0.25  # longer than any read-to-write gap of a competing acquirer
POLL_S = 1.0


def lease_ttl() -> float:
    value = os.environ.get("GEMSTILL_LEASE_SECONDS") or str(DEFAULT_TTL_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise GemstillError(f"GEMSTILL_LEASE_SECONDS={value!r} is not a positive number of seconds; unset it or fix it")
    return seconds


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclasses.dataclass
class Lease:
    fs: Any  # an fsspec filesystem
    path: str
    owner: str
    ttl: float
    log: Callable[[str], None]
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _forget: Callable[[], None] = lambda: None  # drops the release registered for an interrupted exit

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {"owner": self.owner, "heartbeat_at": now, "expires_at": now + self.ttl}

    def _write(self) -> None:
        self.fs.pipe_file(self.path, json.dumps(self._record()).encode())

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            holder = read_lease(self.fs, self.path)
            if holder is not None and holder["owner"] != self.owner:
                self.log(f"warning: the lease {self.path} was taken over by {holder['owner']}; stop this run")
                return
            self._write()

    def release(self) -> None:
        self._forget()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = read_lease(self.fs, self.path)
        if holder is not None and holder["owner"] == self.owner:
            self.fs.rm(self.path)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_STALE = {"owner": "an unreadable lease", "heartbeat_at": 0.0, "expires_at": 0.0}


def read_lease(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        with fs.open(path, "rb") as handle:
            record = json.loads(handle.read())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _STALE  # unreadable: treat as stale
    fields = {"owner": str, "heartbeat_at": (int, float), "expires_at": (int, float)}
    if not isinstance(record, dict) or not all(isinstance(record.get(k), t) for k, t in fields.items()):
        return _STALE  # not a lease gemstill wrote (`{}`, a truncated edit): stale, taken over
    return record


def acquire(fs: Any, path: str, what: str, log: Callable[[str], None] = print, wait_s: float | None = None) -> Lease:
    """Hold the lease at `path` (waiting while a live run holds it), heartbeating until released.

    wait_s: give up after this long with a one-line error (None: wait as long as the holder is alive).
    """
    lease = Lease(fs, path, _owner(), lease_ttl(), log)
    started = time.monotonic()
    told = False
    while True:
        holder = read_lease(fs, path)
        now = time.time()
        if holder is None or holder["expires_at"] < now:
            if holder is not None:
                age = now - holder["heartbeat_at"]
                log(f"{what}: taking over the stale lease of {holder['owner']} (last heartbeat {age:.0f} s ago)")
            lease._write()
            time.sleep(SETTLE_S)
            if (read_lease(fs, path) or {}).get("owner") == lease.owner:
                lease._thread = threading.Thread(target=lease._beat, name=f"lease {path}", daemon=True)
                lease._thread.start()
                lease._forget = interrupt.on_exit(lease.release)  # an interrupted run lets go of it at once
                return lease
            continue  # another run's write won: it holds the lease now
        if wait_s is not None and time.monotonic() - started > wait_s:
            raise GemstillError(
                f"{what} is being computed by {holder['owner']} (heartbeat {now - holder['heartbeat_at']:.0f} s ago); "
                "wait for that run, or stop it and run again once its lease expires"
            )
        if not told:
            log(f"{what}: {holder['owner']} is computing it; waiting for that run to finish")
            told = True
        interrupt.check()
        time.sleep(POLL_S)
