"""The generic flow: run any pipeline spec with any profile as a DAG of Prefect task runs, one per stage.

Every stage is a task run, done ones included: those whose content key is committed in the store come back
`Cached` (the task's cache key is the stage's key), so the UI shows the whole DAG and a flow-run retry resumes
at the stage that failed. Each stage is submitted with `wait_for` on the stages it needs, so the UI draws the
edges and independent stages (teacher_cache and layer_map, train_student and train_baseline) run side by side,
up to `hardware.concurrent_stages` at a time. In a deployment run, a stage whose pipeline entry names a
`work_pool` runs there instead, as a flow run of the deployment `gemstill-stage/<work_pool>` (flows/stage.py)
linked to its task run; `gemstill run` runs every stage in its own process.
"""

from __future__ import annotations

import os
from typing import Any

from gemstill.tasks.stages import artifact_key, deployment_run, run_pipeline_stage, run_stage_on_pool
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from gemstill import distributed
from gemstill.pipeline.plan import Plan, make_plan, select_stages


def _stage_task(plan: Plan, name: str, forced: set[str], on_pool: bool, group: bool):
    planned = plan.stages[name]
    retries = planned.spec.retries
    # every process of a multi-process run calls every stage, done ones included (they meet in run_stage, which
    # finds the commit): a result one process's Prefect remembers and another's does not would part them
    done = plan.store.manifest(name, planned.key) is not None and not group
    return (run_stage_on_pool if on_pool else run_pipeline_stage).with_options(
        name=f"stage:{name}",
        tags=[f"stage:{name}", f"task:{planned.spec.task}", f"profile:{plan.profile.name}"],
        retries=retries.count,
        retry_delay_seconds=exponential_backoff(retries.backoff_seconds)(retries.count) if retries.count else 0,
        retry_jitter_factor=retries.jitter or None,
        timeout_seconds=planned.spec.timeout_seconds,
        # the store is the truth: a key it lacks (or a forced one) runs even if Prefect remembers a result
        refresh_cache=name in forced or not done,
    )


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
    from_deployment = deployment_run()
    plan = make_plan(profile, pipeline, store, overrides, restricted=from_deployment)
    stages, forced = select_stages(plan, refresh or [], only)
    futures: dict[str, PrefectFuture] = {}
    # the processes of a multi-process run must meet every stage in the same order: one stage at a time
    group = distributed.from_environment(os.environ) is not None
    workers = 1 if group else plan.profile.hardware.concurrent_stages
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        for name in stages:
            planned = plan.stages[name]
            named_pool = planned.spec.work_pool
            pool = named_pool if from_deployment else None
            if named_pool and not from_deployment:
                logger.info("stage %s names work pool %s; a run outside a deployment runs it here", name, named_pool)
            logger.info("stage %s: submitted (%s)%s", name, planned.key, f" to work pool {pool}" if pool else "")
            on_pool = {"work_pool": pool, "job_variables": planned.spec.job_variables} if pool else {}
            futures[name] = runner.submit(
                _stage_task(plan, name, forced, on_pool=bool(pool), group=group),
                parameters={
                    **on_pool,
                    "profile": profile,
                    "stage": name,
                    "pipeline": pipeline,
                    "store": store,
                    "overrides": overrides,
                    "fresh": name in forced,
                    "planned_key": planned.key,
                },
                wait_for=[futures[need] for need in planned.spec.needs if need in futures],
            )
        wait(list(futures.values()))  # let independent branches finish before a failure is raised
        results: dict[str, dict[str, Any]] = {}
        for name, future in futures.items():
            result = future.result()  # raises the first failure, naming its stage
            results[name] = {**result, "cached": future.state.name == "Cached"}
    create_table_artifact(
        key=artifact_key(f"{plan.profile.name}-pipeline"),
        table=[{"stage": k, "key": v["key"], "cached": v["cached"]} for k, v in results.items()],
        description=f"pipeline {plan.pipeline.name} with profile {plan.profile.name}",
    )
    return results
