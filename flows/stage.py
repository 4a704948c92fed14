"""One pipeline stage as a flow of its own, so that a stage can run on the work pool its pipeline names.

A stage with `work_pool: P` in the pipeline YAML runs, in a deployment run of the distill flow, as a flow run of
the deployment `gemstill-stage/P` (started by run_deployment with the stage's `job_variables`), on P's workers:
the teacher cache on a big-memory machine, training on an accelerator, over one shared store. Deploy one per pool:
    prefect deploy flows/stage.py:one_stage --name P --pool P
"""

from __future__ import annotations

from typing import Any

from gemstill.tasks.stages import STAGE_FLOW, run_stage_here
from prefect import flow


@flow(name=STAGE_FLOW, log_prints=True)
def one_stage(
    profile: str,
    stage: str,
    pipeline: str | None = None,
    store: str | None = None,
    overrides: dict[str, Any] | None = None,
    fresh: bool = False,
    planned_key: str = "",
) -> dict[str, Any]:
    """Run `stage` of `profile`'s plan here, refusing if its key is not `planned_key` (the calling flow's)."""
    return run_stage_here(profile, stage, pipeline, store, overrides, fresh, planned_key)
