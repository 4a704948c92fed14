"""The generic flow: run any pipeline spec with any profile, skipping stages whose content key is done."""

from __future__ import annotations

from typing import Any

from gemstill.tasks.stages import artifact_key, run_pipeline_stage
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.tasks import exponential_backoff

from gemstill.pipeline.plan import make_plan, select_stages


@flow(name="distill", log_prints=True)
def distill(
    profile: str = "tiny",
    pipeline: str | None = None,
    refresh: list[str] | None = None,
    only: str | None = None,
    store: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run `profile` through its pipeline (or `pipeline`); `overrides` set dotted profile keys."""
    logger = get_run_logger()
    plan = make_plan(profile, pipeline, store, overrides)
    stages, forced = select_stages(plan, refresh or [], only)
    results: dict[str, dict[str, Any]] = {}
    for name in stages:
        planned = plan.stages[name]
        manifest = None if name in forced else plan.store.manifest(name, planned.key)
        if manifest is not None:
            logger.info("stage %s: done (%s), skipped", name, planned.key)
            results[name] = {"stage": name, "key": planned.key, "metrics": manifest["metrics"], "cached": True}
            continue
        retries = planned.spec.retries
        runner = run_pipeline_stage.with_options(
            name=f"stage:{name}",
            retries=retries.count,
            retry_delay_seconds=exponential_backoff(retries.backoff_seconds)(retries.count) if retries.count else 0,
            retry_jitter_factor=retries.jitter or None,
            timeout_seconds=planned.spec.timeout_seconds,
        )
        logger.info("stage %s: running (%s)", name, planned.key)
        result = runner(profile, name, pipeline, store, overrides, fresh=name in forced)
        results[name] = {**result, "cached": False}
    create_table_artifact(
        key=artifact_key(f"{plan.profile.name}-pipeline"),
        table=[{"stage": k, "key": v["key"], "cached": v["cached"]} for k, v in results.items()],
        description=f"pipeline {plan.pipeline.name} with profile {plan.profile.name}",
    )
    return results
