"""The nightly evaluation's Prefect tasks: thin wrappers over gemstill.nightly.

Each rebuilds the plan in its own process (so any worker can run it); Prefect's caching is off because a night
must score the models as they are tonight (the teacher's reasoning rows are kept in the store, by stage key).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from gemstill.tasks.stages import deployment_run
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from gemstill.nightly.record import NightRecord, record_night
from gemstill.nightly.select import Night, nightly_dir, select_night
from gemstill.nightly.suites import SUITES
from gemstill.pipeline.plan import check_hardware, make_plan


@task(cache_policy=NO_CACHE, persist_result=False)
def select_models(profile: str, store: str | None, overrides: dict[str, Any] | None) -> Night:
    """The latest committed student and its teacher, data, baseline and quantized variants."""
    night = select_night(make_plan(profile, None, store, overrides, restricted=deployment_run()))
    get_run_logger().info("nightly: scoring %s", ", ".join(f"{m.name} ({m.key})" for m in night.models))
    return night


@task(cache_policy=NO_CACHE, persist_result=False)
def evaluate_suite(
    profile: str, store: str | None, overrides: dict[str, Any] | None, night: Night, suite: str
) -> list[dict[str, Any]]:
    """One suite's rows (model, model_key, suite, metric, value) for every model of the night."""
    plan = make_plan(profile, None, store, overrides, restricted=deployment_run())
    check_hardware(plan.profile)
    return SUITES[suite](night, plan, get_run_logger().info)


@task(cache_policy=NO_CACHE, persist_result=False)
def record(
    profile: str, store: str | None, overrides: dict[str, Any] | None, run_time: dt.datetime, rows: list[dict]
) -> NightRecord:
    """Append the night to the history (one transaction), compare it with the previous night, draw the trend."""
    plan = make_plan(profile, None, store, overrides, restricted=deployment_run())
    return record_night(nightly_dir(plan.store), plan.profile, run_time, rows)
