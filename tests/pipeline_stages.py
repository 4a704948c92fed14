"""Small custom stages (referenced as "pipeline_stages:NAME" from test pipelines) for the pipeline machinery tests.

Each records that it ran by appending to $GEMSTILL_TEST_LOG, so tests can count executions across processes.
"""

from __future__ import annotations

import json
import os
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
