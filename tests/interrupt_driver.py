"""`python interrupt_driver.py ARGS...`: the gemstill CLI with its store's manifest write slowed down, so a test can
send a signal while a stage is committing (its files checksummed, its manifest not yet written).

It prints `COMMITTING <stage dir>` when the stage named by $GEMSTILL_TEST_SLOW_COMMIT reaches the manifest write,
then waits there in short sleeps (as a slow disk would) for up to a minute before writing it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from gemstill.pipeline import store

_write = store.atomic_write_bytes


def _slow_manifest(target: Path, data: bytes) -> Path:
    if (
        Path(target).name == store.MANIFEST
        and Path(target).parent.parent.name == os.environ["GEMSTILL_TEST_SLOW_COMMIT"]
    ):
        os.write(1, f"COMMITTING {Path(target).parent}\n".encode())  # not print: Prefect logs a stage's prints
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            time.sleep(0.05)
    return _write(target, data)


store.atomic_write_bytes = _slow_manifest

if __name__ == "__main__":
    from gemstill.cli import main

    sys.argv = ["gemstill", *sys.argv[1:]]
    main()
