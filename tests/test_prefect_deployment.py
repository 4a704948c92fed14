"""A real Prefect server on 127.0.0.1, deployments from prefect.yaml, a process worker, and
`prefect deployment run 'distill/tiny'` watched to completion; run again, every stage is a Cached task run;
a run parameter naming a pipeline outside the worker's directories is refused."""

from __future__ import annotations

import json
import shutil

from conftest import seed_store
from prefect_cli import PREFECT, flow_run_id, prefect, process_worker, task_run_states


def test_deployment_run_completes(prefect_server, tiny_teacher, tmp_path):
    env = prefect_server
    assert shutil.which(PREFECT)
    prefect(env, "work-pool", "create", "gemstill-process", "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--name", "distill/tiny")
    store = seed_store(tiny_teacher, tmp_path / "store")  # the run finds data and teacher done
    with process_worker(env, tmp_path / "worker.log"):
        run = prefect(env, "deployment", "run", "distill/tiny", "--param", f"store={store}", "--watch", timeout=900)
        assert "Completed" in run.stdout + run.stderr, run.stdout[-3000:]
        spans = {
            name: (manifest["started_at"], manifest["finished_at"])
            for name in ("train_student", "train_baseline")
            for manifest in [json.loads(next(store.glob(f"{name}/*/manifest.json")).read_text())]
        }
        overlap = min(end for _, end in spans.values()) - max(start for start, _ in spans.values())
        assert overlap > 0, spans  # independent stages ran side by side (hardware.concurrent_stages: 2)
        # a second run: every stage is a task run, each one Cached (its cache key is the stage's content key)
        again = prefect(env, "deployment", "run", "distill/tiny", "--param", f"store={store}", "--watch", timeout=600)
        assert "Completed" in again.stdout + again.stderr, again.stdout[-3000:]
        states = task_run_states(env, flow_run_id(again.stdout))
        assert len(states) == 11 and set(states.values()) == {"Cached"}, states
        # a run parameter naming a pipeline outside the worker's configured directories is refused in one line
        (tmp_path / "evil.yaml").write_text('name: evil\nstages:\n  run: {task: "os:system"}\n')
        refused = prefect(
            env, "deployment", "run", "distill/tiny", "--param", f"pipeline={tmp_path / 'evil.yaml'}",
            "--param", f"store={store}", "--watch", timeout=300, check=False,
        )  # fmt: skip
        assert "Failed" in refused.stdout + refused.stderr, refused.stdout[-3000:]
    worker_log = (tmp_path / "worker.log").read_text()
    assert "evil.yaml is outside the configured directories" in worker_log, worker_log[-3000:]
    assert sorted(p.parent.parent.name for p in store.glob("*/*/manifest.json")) == [
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
