"""The generic flow: run any pipeline spec with any profile as a DAG of Prefect task runs, one per stage.

Every stage is a task run, done ones included: those whose content key is committed in the store come back
`Cached` (the task's cache key is the stage's key), so the UI shows the whole DAG and a flow-run retry resumes
at the stage that failed. A stage is submitted once the stages it needs have completed, with them as its
recorded inputs (the UI draws the edges), so independent stages (teacher_cache and layer_map, train_student and
train_baseline) run side by side, up to `hardware.concurrent_stages` at a time, and no worker thread ever waits
on another. A stage whose need failed is not run. In a deployment run, a stage whose pipeline entry names a
`work_pool` runs there instead, as a flow run of the deployment `gemstill-stage/<work_pool>` (flows/stage.py)
linked to its task run; `gemstill run` runs every stage in its own process.

Each stage that ends writes one line to the `gemstill.run` logger (cached, ran in N s, failed, timed out): the
flow run's log in the UI, and the terminal of `gemstill run`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from typing import Any

from gemstill.tasks.stages import artifact_key, deployment_run, run_pipeline_stage, run_stage_on_pool
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.schemas.objects import TaskRunResult
from prefect.futures import PrefectConcurrentFuture
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from gemstill import distributed, interrupt
from gemstill.pipeline.plan import Plan, make_plan, select_stages
from gemstill.pipeline.request import StageRequest

progress_log = logging.getLogger("gemstill.run")  # one line per stage; `gemstill run` shows it on the terminal


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
        # the store is the truth: a key it lacks (or a forced one) runs even if Prefect remembers a result
        refresh_cache=name in forced or not done,
    )


def _was_cached(future: PrefectConcurrentFuture) -> bool:
    """A Cached task run, or a completed one whose stage was committed before it reached it (another process's
    or run's commit)."""
    state = future.state
    return state.name == "Cached" or (state.is_completed() and bool(future.result().get("reused")))


def _outcome(future: PrefectConcurrentFuture) -> str:
    """The one line a finished stage gets: cached, ran in N s, or how it ended."""
    state = future.state
    if _was_cached(future):
        return "cached"
    if state.is_completed():
        return f"ran in {future.result()['seconds']:.1f} s"
    message = " ".join(str(state.message or "").split())[:200]
    return f"{state.name.lower()}: {message}" if message else state.name.lower()


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
    # the processes of a multi-process run must meet every stage in the same order: one stage at a time
    group = distributed.from_environment(os.environ) is not None
    slots = 1 if group else plan.profile.hardware.concurrent_stages
    futures: dict[str, PrefectConcurrentFuture] = {}
    skipped: set[str] = set()
    reported: set[str] = set()
    waiting = list(stages)  # in dependency order

    def done(name: str) -> bool:
        if name not in futures or not futures[name].wrapped_future.done():
            return False
        futures[name].wait()  # keeps the final state on the future (else .state asks the API, which may lag)
        return True

    with ThreadPoolTaskRunner(max_workers=slots) as runner:
        while True:
            interrupt.check()  # a Ctrl-C: submit nothing more (running stages stop through their watchdog)
            before = len(waiting)
            for name in list(waiting):
                needs = [need for need in plan.stages[name].spec.needs if need in stages]
                blocked = [n for n in needs if n in skipped or (done(n) and not futures[n].state.is_completed())]
                if blocked:  # a need failed (or was not run): this stage cannot run either
                    waiting.remove(name)
                    skipped.add(name)
                    line = f"stage {name}: not run ({', '.join(blocked)} did not complete)"
                    progress_log.info(line)
                    logger.info(line)
                elif all(done(n) for n in needs) and sum(not done(n) for n in futures) < slots:
                    waiting.remove(name)
                    futures[name] = _submit(runner, plan, name, forced, group, from_deployment, profile, pipeline,
                                            store, overrides, [futures[n] for n in needs], logger)  # fmt: skip
            live = [f.wrapped_future for f in futures.values() if not f.wrapped_future.done()]
            if live:
                concurrent.futures.wait(live, return_when=concurrent.futures.FIRST_COMPLETED)
            for name in [n for n in futures if done(n) and n not in reported]:
                reported.add(name)
                progress_log.info("stage %s: %s", name, _outcome(futures[name]))
            if not live and not waiting:
                break
            if not live and len(waiting) == before:
                raise RuntimeError(f"stages {waiting} can never start: their needs are not in this run")
        results: dict[str, dict[str, Any]] = {}
        for name, future in futures.items():
            result = future.result()  # raises the first failure, naming its stage
            results[name] = {**result, "cached": _was_cached(future)}
    create_table_artifact(
        key=artifact_key(f"{plan.profile.name}-pipeline"),
        table=[{"stage": k, "key": v["key"], "cached": v["cached"]} for k, v in results.items()],
        description=f"pipeline {plan.pipeline.name} with profile {plan.profile.name}",
    )
    return results


def _submit(runner, plan, name, forced, group, from_deployment, profile, pipeline, store, overrides, needs, logger):
    """Submit stage `name`, its completed needs recorded as its inputs (the edges of the UI's DAG)."""
    planned = plan.stages[name]
    named_pool = planned.spec.work_pool
    pool = named_pool if from_deployment else None
    if named_pool and not from_deployment:
        logger.info("stage %s names work pool %s; a run outside a deployment runs it here", name, named_pool)
    logger.info("stage %s: submitted (%s)%s", name, planned.key, f" to work pool {pool}" if pool else "")
    request = StageRequest(
        profile=profile,
        stage=name,
        pipeline=pipeline,
        store=store,
        overrides=overrides,
        fresh=name in forced,
        planned_key=planned.key,
    )
    parameters: dict[str, Any] = {"request": request}
    if pool:
        parameters |= {"work_pool": pool, "job_variables": planned.spec.job_variables}
    upstream = {TaskRunResult(id=future.task_run_id) for future in needs}
    return runner.submit(
        _stage_task(plan, name, forced, on_pool=bool(pool), group=group),
        parameters=parameters,
        dependencies={"request": upstream} if upstream else None,
    )
