"""A real Prefect server on 127.0.0.1, deployments from prefect.yaml, the automations of automations.yaml and
two process workers (two work pools), with `prefect deployment run 'distill/distill-tiny'`:
- the flow run's process is SIGKILLed mid-run (as the OOM killer would): the run ends Crashed, the automation
  schedules it again, and the retry completes without recomputing the stages done before the kill;
- the pipeline's `evaluate` names another work pool: it runs there, as a gemstill-stage flow run with the
  stage's job variables, linked to the distill run's task run;
- run again, every stage is a Cached task run and nothing goes to the other pool;
- a run parameter naming a pipeline outside the worker's directories is refused, Failed and not retried."""

from __future__ import annotations

import json
import re
import shutil
import time

import yaml
from conftest import seed_store
from prefect_cli import (
    PREFECT,
    REPO,
    deployment_run,
    flow_run_artifacts,
    flow_run_id,
    flow_runs,
    kill_flow_run_process,
    prefect,
    process_worker,
    task_run_states,
)

STAGES = [
    "evaluate",
    "evaluate_reasoning",
    "export",
    "layer_map",
    "prepare_data",
    "pretrain_teacher",
    "qat",
    "quantize",
    "teacher_cache",
    "train_baseline",
    "train_student",
]
JOB_VARIABLES = {"env": {"GEMSTILL_POOL": "eval"}}


def _pools_pipeline(directory):
    """The tiny profile's pipeline with evaluate on the gemstill-eval pool, in a directory workers are given."""
    spec = yaml.safe_load((REPO / "pipelines" / "from-scratch.yaml").read_text())
    spec["name"] = "tiny-pools"
    spec["stages"]["evaluate"] |= {"work_pool": "gemstill-eval", "job_variables": JOB_VARIABLES}
    directory.mkdir()
    (directory / "tiny-pools.yaml").write_text(yaml.safe_dump(spec))
    return directory


def _wait_for(condition, timeout: float, what: str, every: float = 2.0):
    deadline = time.time() + timeout
    while not (found := condition()):
        assert time.time() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(every)
    return found


def _retry_automation_only(tmp_path):
    """automations.yaml's crash retry alone (the heartbeat one waits 600 s, longer than a test; it is validated
    without a server in test_the_shipped_automations_validate)."""
    shipped = yaml.safe_load((REPO / "automations.yaml").read_text())["automations"]
    path = tmp_path / "automations.yaml"
    path.write_text(yaml.safe_dump({"automations": [a for a in shipped if a["name"] == "gemstill-retry-crashed-runs"]}))
    return path


def test_the_shipped_automations_validate():
    from prefect.events.schemas.automations import AutomationCore

    shipped = yaml.safe_load((REPO / "automations.yaml").read_text())["automations"]
    parsed = [AutomationCore.model_validate(a) for a in shipped]
    assert [a.name for a in parsed] == ["gemstill-retry-crashed-runs", "gemstill-mark-lost-runs-crashed"]
    retry = parsed[0]
    assert retry.trigger.expect == {"prefect.flow-run.Crashed"}
    assert retry.actions[0].type == "change-flow-run-state" and retry.actions[0].state.value == "SCHEDULED"


def _manifest(store, stage):
    found = list(store.glob(f"{stage}/*/manifest.json"))
    return json.loads(found[0].read_text()) if found else None


def test_deployment_runs_retry_crashes_use_work_pools_and_come_back_cached(prefect_server, tiny_teacher, tmp_path):
    env = {
        **prefect_server,
        "GEMSTILL_PIPELINES": str(_pools_pipeline(tmp_path / "pipelines")),
        "GEMSTILL_STORES": str(tmp_path),  # the workers' store root: a run's store parameter must lie under it
        "GEMSTILL_LEASE_SECONDS": "10",  # the killed run's leases expire quickly
    }
    assert shutil.which(PREFECT)
    prefect(env, "automation", "create", "--from-file", str(_retry_automation_only(tmp_path)))
    for pool in ("gemstill-process", "gemstill-eval"):
        prefect(env, "work-pool", "create", pool, "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--name", "distill-tiny")
    stage_flow = ["flows/stage.py:one_stage", "--name", "gemstill-eval", "--pool", "gemstill-eval"]
    prefect(env, "--no-prompt", "deploy", *stage_flow)
    store = seed_store(tiny_teacher, tmp_path / "store")  # the run finds data and teacher done
    # held-out scoring cut to a few sequences and greedy CoT on two problems: the run, not its scores, is tested
    quick = {"evaluate.max_sequences": 32, "reasoning.limit": 2, "reasoning.methods": ["cot"]}
    params = ["--params", json.dumps({"store": str(store), "pipeline": "tiny-pools", "overrides": quick})]
    # no --limit: Prefect 3.8.8's worker crashes when a retried run comes back before it freed the run's slot
    worker = process_worker(env, tmp_path / "worker.log", limit=None)
    with worker, process_worker(env, tmp_path / "eval.log", "gemstill-eval", limit=None):
        started = prefect(env, "deployment", "run", "distill/distill-tiny", *params)
        run = flow_run_id(started.stdout)
        early = _wait_for(
            lambda: all(_manifest(store, s) for s in ("teacher_cache", "layer_map")), 600, "the first stages"
        )
        before = {s: _manifest(store, s)["finished_at"] for s in ("teacher_cache", "layer_map")}
        kill_flow_run_process(run)
        _wait_for(lambda: _manifest(store, "export"), 900, "the crashed run to be retried and finish")
        ended = _wait_for(
            lambda: next((r for r in flow_runs(env, "distill") if r["id"] == run and r["state"] == "Completed"), None),
            120,
            "the retried run to be Completed",
            every=5,
        )
        # one SIGKILL is one Crashed, then a retry; Prefect 3.8.8's worker may report the same dead process Crashed
        # a second time once the automation has already scheduled the retry (seen in the server's state history:
        # Crashed "Process exited…", AwaitingRetry, Pending, Submitting, Crashed "Flow run infrastructure
        # exited…"), which earns one more retry: the attempts share the store, whose leases let one compute a stage
        # and the other find it committed
        assert early and 2 <= ended["run_count"] <= 3, ended
        # what the UI shows of the completed run: every progress artifact at 100% (the retried stages went on with
        # the ones their killed attempt left), and the reports' plots embedded, never a link into the store
        artifacts = flow_run_artifacts(env, run, *(r["id"] for r in flow_runs(env, "gemstill-stage")))
        progress = {a["key"]: a["data"] for a in artifacts if a["type"] == "progress"}
        assert len(progress) >= 6 and set(progress.values()) == {100.0}, progress
        reports = [a["data"] for a in artifacts if a["type"] == "markdown"]
        assert len(reports) >= 2 and all("data:image/png;base64," in r for r in reports), [r[:300] for r in reports]
        assert not any(re.search(r"\]\((?!data:)[^)]*\.png\)", r) for r in reports)
        assert ended["history"].index("Crashed") < ended["history"].index("AwaitingRetry"), ended["history"]
        assert "SIGKILL" in ended["crashes"][0], ended["crashes"]  # the worker saw the process killed, and said so
        assert {s: _manifest(store, s)["finished_at"] for s in before} == before  # the retry reused them
        spans = {s: (_manifest(store, s)["started_at"], _manifest(store, s)["finished_at"]) for s in STAGES}
        train = [spans["train_student"], spans["train_baseline"]]
        assert min(end for _, end in train) > max(start for start, _ in train), spans  # side by side
        # evaluate ran on the other pool, as a stage flow run with its job variables, under its task run here
        remotes = flow_runs(env, "gemstill-stage")  # one per attempt that reached evaluate
        assert 1 <= len(remotes) <= ended["run_count"] - 1, remotes
        for remote in remotes:
            assert remote["state"] == "Completed" and remote["work_pool"] == "gemstill-eval", remote
            assert remote["job_variables"] == JOB_VARIABLES, remote
            assert remote["parameters"]["request"]["stage"] == "evaluate", remote
            assert remote["parent_task_run"] is not None
            assert _manifest(store, "evaluate")["key"] == remote["parameters"]["request"]["planned_key"]
        # a second run: every stage is a task run, each one Cached (its cache key is the stage's content key)
        again, state = deployment_run(env, "distill/distill-tiny", *params, timeout=600)
        assert state == "Completed", state
        states = task_run_states(env, again)
        assert len(states) == 11 and set(states.values()) == {"Cached"}, states
        assert len(flow_runs(env, "gemstill-stage")) == len(remotes)  # a cached stage is not sent to its pool again
        # a run parameter naming a pipeline outside the worker's configured directories is refused in one line
        (tmp_path / "evil.yaml").write_text('name: evil\nstages:\n  run: {task: "os:system"}\n')
        refused, state = deployment_run(
            env,
            "distill/distill-tiny",
            "--param",
            f"pipeline={tmp_path / 'evil.yaml'}",
            "--param",
            f"store={store}",
            timeout=300,
        )
        assert state == "Failed", state
        time.sleep(5)  # time enough for an automation to (wrongly) retry it
        (evil,) = [r for r in flow_runs(env, "distill") if r["id"] == refused]
        assert evil["state"] == "Failed" and evil["run_count"] == 1, evil  # bad input is not retried
    worker_log = (tmp_path / "worker.log").read_text()
    assert "evil.yaml is outside the configured directories" in worker_log, worker_log[-3000:]
    assert sorted(p.parent.parent.name for p in store.glob("*/*/manifest.json")) == STAGES
