"""`gemstill launch`: N local processes of one multi-process run, joined on 127.0.0.1 by gemstill.distributed.

For tests and for several processes on one big VM (one per GPU, say). Kubernetes, SLURM and TPU VMs start their
processes themselves (deploy/); this only sets the same environment they do and watches the processes: their
output is printed with a "[i]" prefix, and when one fails the others are stopped (they would wait forever at
the next barrier), so the launch exits with the failure's code and can be run again to resume.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from gemstill import interrupt
from gemstill.errors import GemstillError

STOP_GRACE_S = 3.0  # within gemstill.interrupt's grace: a launch stopped by Ctrl-C stops its processes first


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_environment(
    base: Mapping[str, str], index: int, processes: int, port: int, devices_per_process: int | None
) -> dict[str, str]:
    """The environment of process `index`: the group's coordinates, and with devices_per_process its own devices
    (D host devices on CPU, devices index*D .. index*D + D-1 of a multi-GPU node)."""
    env = dict(base)
    env.update(
        PYTHONUNBUFFERED="1",  # each line reaches the relay as it is printed, not lost in a buffer at a crash
        PYTHONFAULTHANDLER="1",  # a process aborted by the runtime (a dead peer) prints where it was
        GEMSTILL_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        GEMSTILL_NUM_PROCESSES=str(processes),
        GEMSTILL_PROCESS_ID=str(index),
    )
    if devices_per_process is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
        first = index * devices_per_process
        env["GEMSTILL_LOCAL_DEVICE_IDS"] = ",".join(str(first + d) for d in range(devices_per_process))
    if index > 0 and not env.get("PREFECT_API_URL"):
        # each process's embedded Prefect API needs its own database; process 0 keeps the user's
        home = Path(env.get("PREFECT_HOME") or Path.home() / ".prefect")
        env["PREFECT_HOME"] = str(home / "gemstill-launch" / f"process-{index}")
    return env


def _relay(index: int, stream, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(f"[{index}] {line.decode(errors='replace')}")
        out.flush()


def _stop(children: Sequence[subprocess.Popen]) -> None:
    """SIGTERM every running child's process group, then SIGKILL what is left after the grace period."""
    for child in children:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def launch(
    command: Sequence[str], processes: int, devices_per_process: int | None = None, port: int | None = None
) -> int:
    """Run `command` as processes 0..N-1 of one group and wait; the exit code of the first that fails, else 0."""
    if not command:
        raise GemstillError("gemstill launch: no command; write it after --, e.g. -- gemstill run tiny")
    if processes < 1:
        raise GemstillError(f"gemstill launch: --processes {processes}; give at least 1")
    if devices_per_process is not None and devices_per_process < 1:
        raise GemstillError(f"gemstill launch: --devices-per-process {devices_per_process}; give at least 1")
    port = port or free_port()
    children: list[subprocess.Popen] = []
    relays = []
    for index in range(processes):
        env = process_environment(os.environ, index, processes, port, devices_per_process)
        if "PREFECT_HOME" in env:
            Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
        try:
            child = subprocess.Popen(
                list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as err:
            _stop(children)
            raise GemstillError(f"gemstill launch: cannot start {command[0]!r} ({err}); check the command") from None
        children.append(child)
        relay = threading.Thread(target=_relay, args=(index, child.stdout, sys.stdout), daemon=True)
        relay.start()
        relays.append(relay)
    code = 0
    forget = interrupt.on_exit(lambda: _kill(children))  # a forced exit leaves no process behind
    try:
        while code == 0 and any(child.poll() is None for child in children):
            failed = next((c for c in children if c.poll() not in (None, 0)), None)
            if failed is not None:
                code = failed.returncode
                index = children.index(failed)
                print(f"gemstill launch: process {index} exited with {code}; stopping the others", file=sys.stderr)
                break
            time.sleep(0.2)
        else:
            code = next((c.returncode for c in children if c.returncode), 0)
    except interrupt.Interrupted:  # Ctrl-C or SIGTERM: the processes stop first (a relaunch resumes them)
        _stop(children)
        raise
    finally:
        _stop(children)
        forget()
        for relay in relays:
            relay.join(timeout=1)
    return code


def _kill(children: Sequence[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
