"""The nightly evaluation flow: score the latest committed student(s) and the teacher on the profile's suites,
append the night to the store's history, publish it, and fail the run when a metric regressed."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from gemstill.tasks.nightly import evaluate_suite, record, select_models
from gemstill.tasks.stages import artifact_key, deployment_run
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from gemstill.pipeline.plan import make_plan
from gemstill.plots import embed_images


@flow(name="nightly-eval", log_prints=True)
def nightly_eval(
    profile: str = "tiny",
    store: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate `profile`'s latest committed models; `overrides` set dotted profile keys (e.g. nightly.suites)."""
    logger = get_run_logger()
    run_time = dt.datetime.now(dt.UTC)
    loaded = make_plan(profile, None, store, overrides, restricted=deployment_run()).profile  # checked, then read
    night = select_models(profile, store, overrides)
    rows: list[dict[str, Any]] = []
    for suite in loaded.nightly.suites:
        rows += evaluate_suite.with_options(name=f"suite:{suite}")(profile, store, overrides, night, suite)
    recorded = record(profile, store, overrides, run_time, rows)
    create_table_artifact(
        key=artifact_key(f"{loaded.name}-nightly"),
        table=[{"run_time": recorded.run_time, **row} for row in rows],
        description=f"nightly evaluation of {loaded.name}, {recorded.run_time}",
    )
    create_markdown_artifact(
        key=artifact_key(f"{loaded.name}-nightly-report"),
        markdown=embed_images(recorded.markdown, recorded.report.parent),
        description=f"tonight against the previous night; trend plot {recorded.trend}",
    )
    logger.info("nightly: %d rows recorded; report %s, trend %s", len(rows), recorded.report, recorded.trend)
    recorded.raise_for_regressions()  # the night is recorded and published first
    return {
        "run_time": recorded.run_time,
        "previous_run_time": recorded.previous_time,
        "changes": [{**dataclasses.asdict(c), "regressed": c.regressed} for c in recorded.changes],
        "trend": str(recorded.trend),
        "report": str(recorded.report),
    }
