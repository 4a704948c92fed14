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

from gemstill.pipeline.request import StageRequest


@flow(name=STAGE_FLOW, log_prints=True)
def one_stage(request: StageRequest) -> dict[str, Any]:
    """Run the requested stage here, refusing if its key is not the one the calling flow planned."""
    return run_stage_here(request)
