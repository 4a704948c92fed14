"""Small custom stages (referenced as "pipeline_stages:NAME" from test pipelines) for the pipeline machinery tests.

Each records that it ran by appending to $GEMSTILL_TEST_LOG, so tests can count executions across processes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from gemstill.errors import GemstillError
from gemstill.pipeline.context import StageContext


def _record(ctx: StageContext) -> None:
    with open(os.environ["GEMSTILL_TEST_LOG"], "a") as handle:
        handle.write(ctx.stage + "\n")


def source(ctx: StageContext) -> dict[str, Any]:
    _record(ctx)
    (ctx.workdir / "numbers.json").write_text(json.dumps(list(range(ctx.profile.data.seed, ctx.profile.data.seed + 5))))
    return {"count": 5}


def double(ctx: StageContext) -> dict[str, Any]:
    _record(ctx)
    numbers = json.loads((ctx.input("pipeline_stages:source") / "numbers.json").read_text())
    (ctx.workdir / "doubled.json").write_text(json.dumps([2 * n for n in numbers]))
    return {"sum": sum(2 * n for n in numbers)}


def total(ctx: StageContext) -> dict[str, Any]:
    _record(ctx)
    doubled = json.loads((ctx.input("pipeline_stages:double") / "doubled.json").read_text())
    return {"total": sum(doubled)}


def flaky(ctx: StageContext) -> dict[str, Any]:
    """Fails on its first attempt (a transient error), succeeds on the retry."""
    _record(ctx)
    marker = Path(os.environ["GEMSTILL_TEST_LOG"]).with_suffix(".flaky")
    if not marker.exists():
        marker.write_text("failed once")
        raise ConnectionError("injected transient failure")
    return {"attempts": 2}


def bad_input(ctx: StageContext) -> dict[str, Any]:
    _record(ctx)
    raise GemstillError("injected bad input; fix the profile")


def _meet(ctx: StageContext) -> None:
    """With $GEMSTILL_TEST_MEET=DIR,N: mark this stage started in DIR and wait (60 s at most) until N stages
    have, so a test sees stages overlap only if they really run at once, however slowly each one starts."""
    if not (meet := os.environ.get("GEMSTILL_TEST_MEET")):
        return
    directory, count = meet.rsplit(",", 1)
    Path(directory, f"{ctx.stage}.started").touch()
    deadline = time.monotonic() + 60.0
    while len(list(Path(directory).glob("*.started"))) < int(count) and time.monotonic() < deadline:
        time.sleep(0.05)


def halting(ctx: StageContext) -> dict[str, Any]:
    """`double`, but slow (writes its file in two halves, a second apart) and failing on demand: with
    $GEMSTILL_TEST_FAIL naming the stage, it raises after writing half of its output."""
    _record(ctx)
    _meet(ctx)
    numbers = json.loads((ctx.input("pipeline_stages:source") / "numbers.json").read_text())
    out = ctx.workdir / "doubled.json"
    text = json.dumps([2 * n + ctx.profile.data.seed for n in numbers])
    out.write_text(text[: len(text) // 2])
    ctx.progress(0.5)
    if os.environ.get("GEMSTILL_TEST_FAIL") == ctx.stage:
        raise RuntimeError("injected failure halfway through")
    time.sleep(float(os.environ.get("GEMSTILL_TEST_SLEEP", "0")))
    out.write_text(text)
    ctx.progress(1.0)
    return {"sum": sum(json.loads(text))}


def after_left(ctx: StageContext) -> dict[str, Any]:
    _record(ctx)
    return {}


def resumable(ctx: StageContext) -> dict[str, Any]:
    """Work in two halves, persisting the first: with $GEMSTILL_TEST_FAIL naming the stage it dies after the first
    half; a later run (on any machine that sees the store) finds that half and does only the second."""
    _record(ctx)
    first = ctx.workdir / "first-half.json"
    resumed = first.is_file()
    if not resumed:
        first.write_text(json.dumps({"half": 1}))
        ctx.persist(first)
    if os.environ.get("GEMSTILL_TEST_FAIL") == ctx.stage:
        raise RuntimeError("killed after the first half")
    (ctx.workdir / "second-half.json").write_text(json.dumps({"half": 2}))
    return {"resumed": resumed, "halves": 2}


def undeclared(ctx: StageContext) -> dict[str, Any]:
    """Reads a setting its pipeline entry may not declare (teacher_cache.k)."""
    _record(ctx)
    return {"k": ctx.profile.teacher_cache.k}


def stalling(ctx: StageContext) -> dict[str, Any]:
    """Writes partial work, then works on without ever reporting (no log line, no progress) for a minute."""
    _record(ctx)
    (ctx.workdir / "partial.json").write_text("[1, 2]")
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        sum(range(1000))
    return {"finished": 1}
