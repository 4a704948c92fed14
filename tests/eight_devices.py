"""Checks that need 8 CPU devices, which XLA only creates if told before jax starts: a test module lists them in
CHECKS, runs them all in one child process (the module run as a script: one jax start-up), and fails each
check's test with the traceback the child reported for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

RESULT = "gemstill-check-result: "


def run_in_child(script: str, checks: Mapping[str, Callable], *args: str, timeout: float = 600) -> dict[str, str]:
    """Each check's error ("" when it passed), from `script` run with 8 devices and `args`."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=timeout)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            outcome = json.loads(line.removeprefix(RESULT))
            results[outcome["check"]] = outcome["error"]
    assert set(results) == set(checks), proc.stdout[-2000:] + proc.stderr[-4000:]
    return results


def report(checks: Mapping[str, Callable], tmp: Path | None = None) -> None:
    """The child's side: run every check (with its own directory under `tmp` when given) and print its outcome."""
    for name, check in checks.items():
        try:
            check() if tmp is None else check(tmp / name)
            error = ""
        except Exception:  # reported to the parent, which fails that check's test with this traceback
            error = traceback.format_exc()
        print(RESULT + json.dumps({"check": name, "error": error}), flush=True)
