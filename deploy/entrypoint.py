"""The command of every pod of a multi-host work pool (deploy/tpu-slice): one flow run, one process per host.

    python deploy/entrypoint.py prefect flow-run execute

Prefect runs a flow run in one process, but a multi-host JAX program runs in every process of the slice. So
process 0 executes the flow run (the command given, which reports its state to Prefect as usual) and every other
process runs the same stage beside it: it reads the flow run's parameters from the Prefect API
(PREFECT__FLOW_RUN_ID, set by the worker in every pod) and calls gemstill's run_stage with them, as the flow's
`one_stage` does. In run_stage the processes join through jax.distributed (GEMSTILL_* environment, see
gemstill/distributed.py), agree on the stage's key and run it together; process 0 alone commits the result and
reports to Prefect. Only `gemstill-stage` flow runs (flows/stage.py) can be followed this way.

The process number is GEMSTILL_PROCESS_ID or, in a Kubernetes Indexed Job or JobSet, JOB_COMPLETION_INDEX.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

STAGE_FLOW = "gemstill-stage"  # gemstill.tasks.stages.STAGE_FLOW, the flow of flows/stage.py


def process_id(env: Mapping[str, str]) -> int:
    """This process's number in the slice, read as gemstill.distributed reads it (0 in a one-process run)."""
    from gemstill.distributed import from_environment

    group = from_environment(env)
    return 0 if group is None else group.index


def read_flow_run(flow_run_id: str) -> tuple[str, dict[str, Any], bool]:
    """The flow's name, the run's parameters and whether it came from a deployment, from the Prefect API."""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(UUID(flow_run_id))
        flow = client.read_flow(flow_run.flow_id)
    return flow.name, dict(flow_run.parameters), flow_run.deployment_id is not None


def follow(env: Mapping[str, str], read: Callable[[str], tuple[str, dict[str, Any], bool]] = read_flow_run) -> None:
    """Run, in this process, the stage that process 0's flow run runs (without reporting to Prefect)."""
    flow_run_id = env.get("PREFECT__FLOW_RUN_ID", "")
    if not flow_run_id:
        raise SystemExit("deploy/entrypoint.py: PREFECT__FLOW_RUN_ID is not set; start this from a Prefect worker")
    flow_name, parameters, from_deployment = read(flow_run_id)
    if flow_name != STAGE_FLOW:
        raise SystemExit(
            f"deploy/entrypoint.py: flow run {flow_run_id} is of flow {flow_name!r}; a multi-host pool runs only "
            f"{STAGE_FLOW} flow runs (deploy flows/stage.py:one_stage to it and name the pool in a stage's work_pool)"
        )
    from gemstill.pipeline.plan import run_stage
    from gemstill.pipeline.request import StageRequest

    # as run_stage_here in process 0 (tasks/stages.py), minus Prefect's logger and artifacts
    request = StageRequest.model_validate(parameters["request"])
    plan = request.plan(restricted=from_deployment)
    run_stage(plan, request.stage, fresh=request.fresh, log=lambda line: print(line, flush=True))


def main(
    argv: list[str],
    env: Mapping[str, str] = os.environ,
    execute: Callable[[list[str]], Any] = lambda command: os.execvp(command[0], command),
    follower: Callable[[Mapping[str, str]], None] = follow,
) -> None:
    if not argv:
        raise SystemExit("usage: python deploy/entrypoint.py COMMAND... (process 0 runs COMMAND)")
    if process_id(env) == 0:
        execute(argv)  # replaces this process: Prefect's own command gets the signals
    else:
        follower(env)


if __name__ == "__main__":
    main(sys.argv[1:])
