"""One Prefect task that runs any pipeline stage: a thin wrapper over gemstill.pipeline.plan.run_stage.

Its result is the stage's small JSON manifest, never arrays or checkpoints. Prefect caches it under the stage's
content key (stage_cache_key), so a done stage is a `Cached` task run; the artifact store stays the truth.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from gemstill.errors import GemstillError
from gemstill.pipeline.plan import make_plan, run_stage


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def deployment_run() -> bool:
    """Whether this flow run was started from a deployment: then its parameters come from whoever started it, and
    the plan is restricted to what the worker is configured with (gemstill.pipeline.trust)."""
    from prefect.runtime import deployment

    return deployment.id is not None


def stage_cache_key(context, parameters: dict[str, Any]) -> str:
    """Prefect's cache key of a stage run: the stage's content key, so a run whose key is committed shows as
    `Cached` (the flow refreshes the cache wherever the store lacks the key, so the two never disagree)."""
    return f"gemstill-{parameters['stage']}-{parameters['planned_key']}"


class ProgressArtifact:
    """A Prefect progress artifact for one stage run, updated at most every `every_s` seconds (and at 100%)."""

    def __init__(self, key: str, description: str, every_s: float = 5.0):
        self.id = create_progress_artifact(progress=0.0, key=key, description=description)
        self.every_s = every_s
        self.last = time.monotonic()

    def __call__(self, fraction: float) -> None:
        now = time.monotonic()
        if fraction >= 1.0 or now - self.last >= self.every_s:
            update_progress_artifact(artifact_id=self.id, progress=round(100.0 * min(fraction, 1.0), 1))
            self.last = now


def _retry_unless_user_error(task, task_run, state) -> bool:
    """A GemstillError names bad input: retrying cannot help, so fail at once."""
    return not isinstance(state.result(raise_on_failure=False), GemstillError)


def run_stage_here(
    profile: str,
    stage: str,
    pipeline: str | None = None,
    store: str | None = None,
    overrides: dict[str, Any] | None = None,
    fresh: bool = False,
    planned_key: str = "",
) -> dict[str, Any]:
    """Rebuild the plan in this process (so any worker can run it) and run one stage of it, refusing at once if
    the stage's key here is not the one the flow planned; the body of a stage task run and of a stage flow run."""
    logger = get_run_logger()
    plan = make_plan(profile, pipeline, store, overrides, restricted=deployment_run())
    key = plan.stages[stage].key
    if planned_key and key != planned_key:
        raise GemstillError(
            f"stage {stage}: its key here is {key} but the flow planned {planned_key}: the code, profile, data or "
            "teacher changed since the run started (or differ on this worker); start the run again"
        )
    progress = ProgressArtifact(artifact_key(f"{plan.profile.name}-{stage}-progress"), f"{stage} ({key})")
    manifest = run_stage(plan, stage, fresh=fresh, log=logger.info, progress=progress)
    rows = [{"metric": k, "value": v} for k, v in manifest["metrics"].items()]
    create_table_artifact(
        key=artifact_key(f"{plan.profile.name}-{stage}"),
        table=rows,
        description=f"{stage} ({manifest['key']}) in {manifest['seconds']:.1f} s",
    )
    report = plan.store.local_dir(stage, manifest["key"]) / "report.md"
    if report.is_file():  # the evaluate stage's table (its PNGs sit beside it in the store)
        create_markdown_artifact(
            key=artifact_key(f"{plan.profile.name}-{stage}-report"),
            markdown=report.read_text(),
            description=f"{stage} report ({manifest['key']})",
        )
    logger.info("stage %s committed as %s in %.1f s", stage, manifest["key"], manifest["seconds"])
    return _summary(manifest)


def _summary(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: manifest[k] for k in ("stage", "key", "metrics", "seconds")}


@task(cache_key_fn=stage_cache_key, persist_result=True, retry_condition_fn=_retry_unless_user_error)
def run_pipeline_stage(
    profile: str,
    stage: str,
    pipeline: str | None = None,
    store: str | None = None,
    overrides: dict[str, Any] | None = None,
    fresh: bool = False,
    planned_key: str = "",
) -> dict[str, Any]:
    """One stage, run in the flow's own process."""
    return run_stage_here(profile, stage, pipeline, store, overrides, fresh, planned_key)


STAGE_FLOW = "gemstill-stage"  # flows/stage.py; its deployment named after a work pool runs stages there


@task(cache_key_fn=stage_cache_key, persist_result=True, retry_condition_fn=_retry_unless_user_error)
def run_stage_on_pool(
    work_pool: str,
    job_variables: dict[str, Any],
    profile: str,
    stage: str,
    pipeline: str | None = None,
    store: str | None = None,
    overrides: dict[str, Any] | None = None,
    fresh: bool = False,
    planned_key: str = "",
) -> dict[str, Any]:
    """One stage, run as a flow run of the deployment `gemstill-stage/<work_pool>` (on that pool's workers, with
    `job_variables`), waited for; its result is read back from the shared store, which is the truth."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    deployment = f"{STAGE_FLOW}/{work_pool}"
    parameters = {
        "profile": profile,
        "stage": stage,
        "pipeline": pipeline,
        "store": store,
        "overrides": overrides,
        "fresh": fresh,
        "planned_key": planned_key,
    }
    try:
        flow_run = run_deployment(deployment, parameters=parameters, job_variables=job_variables or None, timeout=None)
    except ObjectNotFound:
        raise GemstillError(
            f"stage {stage} names work_pool {work_pool}, but the server has no deployment {deployment}; deploy one: "
            f"prefect deploy flows/stage.py:one_stage --name {work_pool} --pool {work_pool}"
        ) from None
    if not flow_run.state.is_completed():
        raise RuntimeError(
            f"stage {stage} ended {flow_run.state.name} on work pool {work_pool} (flow run {flow_run.name}): "
            f"{flow_run.state.message}"
        )
    plan = make_plan(profile, pipeline, store, overrides, restricted=deployment_run())
    manifest = plan.store.manifest(stage, planned_key)
    if manifest is None:
        raise GemstillError(
            f"stage {stage} completed on work pool {work_pool} but {plan.store.root} has no commit of {planned_key}: "
            "that pool's workers must see the same store (an fsspec URL every machine reaches)"
        )
    get_run_logger().info("stage %s committed on work pool %s as %s", stage, work_pool, planned_key)
    return _summary(manifest)
