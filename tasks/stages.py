"""One Prefect task that runs any pipeline stage: a thin wrapper over gemstill.pipeline.plan.run_stage.

Its result is the stage's small JSON manifest summary, never arrays or checkpoints. Prefect caches it under the
stage's content key (stage_cache_key), so a done stage is a `Cached` task run; the artifact store stays the truth.
A stage's `timeout_seconds` is enforced by run_stage itself (gemstill.pipeline.watchdog), in the worker thread
Prefect runs it in, and its TimeoutError makes the task run `TimedOut`; Prefect's own task timeout is not set,
since it cannot interrupt a worker thread.
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
from gemstill.pipeline.plan import run_stage
from gemstill.pipeline.request import StageRequest
from gemstill.plots import embed_images


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
    request = StageRequest.model_validate(parameters["request"])
    return f"gemstill-{request.stage}-{request.planned_key}"


class ProgressArtifact:
    """A Prefect progress artifact for one stage run, updated at most every `every_s` seconds, and at its end: 100%
    when the stage completes, the last fraction reached when it fails."""

    def __init__(self, key: str, description: str, every_s: float = 5.0):
        # one per stage and flow run: a retried attempt (a task retry, or the flow run retried after a crash)
        # goes on with the artifact its killed attempt left behind, instead of leaving that one short of 100%
        self.id = _earlier_progress(key) or create_progress_artifact(progress=0.0, key=key, description=description)
        self.every_s = every_s
        self.last = time.monotonic()
        self.fraction = 0.0
        self.shown = 0.0

    def __call__(self, fraction: float) -> None:
        self.fraction = min(max(fraction, 0.0), 1.0)
        now = time.monotonic()
        if self.fraction >= 1.0 or now - self.last >= self.every_s:
            self._show(self.fraction)
            self.last = now

    def finish(self, completed: bool) -> None:
        self._show(1.0 if completed else self.fraction)

    def _show(self, fraction: float) -> None:
        if fraction != self.shown:
            update_progress_artifact(artifact_id=self.id, progress=round(100.0 * fraction, 1))
            self.shown = fraction


def _earlier_progress(key: str):
    """The id of the progress artifact of `key` an earlier attempt made in this flow run, if any."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.runtime import flow_run

    if not flow_run.id:
        return None
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])
            )
        )
    return found[0].id if found else None


def _retry_unless_user_error(task, task_run, state) -> bool:
    """A GemstillError names bad input: retrying cannot help, so fail at once."""
    return not isinstance(state.result(raise_on_failure=False), GemstillError)


def run_stage_here(request: StageRequest) -> dict[str, Any]:
    """Rebuild the plan in this process (so any worker can run it) and run one stage of it, refusing at once if
    the stage's key here is not the one the flow planned; the body of a stage task run and of a stage flow run."""
    logger = get_run_logger()
    plan = request.plan(restricted=deployment_run())
    stage, key = request.stage, plan.stages[request.stage].key
    progress = ProgressArtifact(artifact_key(f"{plan.profile.name}-{stage}-progress"), f"{stage} ({key})")
    # committed before this run reached it (a multi-process run calls every stage; another run may have made it)
    reused = not request.fresh and plan.store.manifest(stage, key) is not None
    try:
        manifest = run_stage(plan, stage, fresh=request.fresh, log=logger.info, progress=progress)
    except BaseException:
        progress.finish(completed=False)
        raise
    progress.finish(completed=True)
    rows = [{"metric": k, "value": v} for k, v in manifest["metrics"].items()]
    create_table_artifact(
        key=artifact_key(f"{plan.profile.name}-{stage}"),
        table=rows,
        description=f"{stage} ({manifest['key']}) in {manifest['seconds']:.1f} s",
    )
    directory = plan.store.local_dir(stage, manifest["key"])
    report = directory / "report.md"
    if report.is_file():  # a report stage's table, its PNGs embedded (the UI cannot reach the store's files)
        create_markdown_artifact(
            key=artifact_key(f"{plan.profile.name}-{stage}-report"),
            markdown=embed_images(report.read_text(), directory),
            description=f"{stage} report ({manifest['key']})",
        )
    logger.info("stage %s committed as %s in %.1f s", stage, manifest["key"], manifest["seconds"])
    return {**_summary(manifest), "reused": reused}


def _summary(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: manifest[k] for k in ("stage", "key", "metrics", "seconds")}


@task(cache_key_fn=stage_cache_key, persist_result=True, retry_condition_fn=_retry_unless_user_error)
def run_pipeline_stage(request: StageRequest) -> dict[str, Any]:
    """One stage, run in the flow's own process."""
    return run_stage_here(request)


STAGE_FLOW = "gemstill-stage"  # flows/stage.py; its deployment named after a work pool runs stages there


@task(cache_key_fn=stage_cache_key, persist_result=True, retry_condition_fn=_retry_unless_user_error)
def run_stage_on_pool(work_pool: str, job_variables: dict[str, Any], request: StageRequest) -> dict[str, Any]:
    """One stage, run as a flow run of the deployment `gemstill-stage/<work_pool>` (on that pool's workers, with
    `job_variables`), waited for; its result is read back from the shared store, which is the truth."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    deployment = f"{STAGE_FLOW}/{work_pool}"
    try:
        flow_run = run_deployment(
            deployment,
            parameters={"request": request.model_dump(mode="json")},
            job_variables=job_variables or None,
            timeout=None,
        )
    except ObjectNotFound:
        raise GemstillError(
            f"stage {request.stage} names work_pool {work_pool}, but the server has no deployment {deployment}; "
            f"deploy one: prefect deploy flows/stage.py:one_stage --name {work_pool} --pool {work_pool}"
        ) from None
    if not flow_run.state.is_completed():
        raise RuntimeError(
            f"stage {request.stage} ended {flow_run.state.name} on work pool {work_pool} (flow run "
            f"{flow_run.name}): {flow_run.state.message}"
        )
    plan = request.plan(restricted=deployment_run())
    manifest = plan.store.manifest(request.stage, request.planned_key)
    if manifest is None:
        raise GemstillError(
            f"stage {request.stage} completed on work pool {work_pool} but {plan.store.root} has no commit of "
            f"{request.planned_key}: that pool's workers must see the same store (an fsspec URL every machine reaches)"
        )
    get_run_logger().info("stage %s committed on work pool %s as %s", request.stage, work_pool, request.planned_key)
    return _summary(manifest)
