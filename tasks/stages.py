"""One Prefect task that runs any pipeline stage: a thin wrapper over gemstill.pipeline.plan.run_stage.

Its result is the stage's small JSON manifest, never arrays or checkpoints; Prefect's own caching is off
because the artifact store caches by content.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from gemstill.errors import GemstillError
from gemstill.pipeline.plan import make_plan, run_stage


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _retry_unless_user_error(task, task_run, state) -> bool:
    """A GemstillError names bad input: retrying cannot help, so fail at once."""
    return not isinstance(state.result(raise_on_failure=False), GemstillError)


@task(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=_retry_unless_user_error)
def run_pipeline_stage(
    profile: str,
    stage: str,
    pipeline: str | None = None,
    store: str | None = None,
    overrides: dict[str, Any] | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Rebuild the plan in this process (so any worker can run it) and run one stage of it."""
    logger = get_run_logger()
    plan = make_plan(profile, pipeline, store, overrides)
    manifest = run_stage(plan, stage, fresh=fresh, log=logger.info)
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
    return {k: manifest[k] for k in ("stage", "key", "metrics", "seconds")}
