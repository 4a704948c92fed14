"""A real Prefect server on 127.0.0.1, deployments from prefect.yaml, a process worker, and
`prefect deployment run 'distill/tiny'` watched to completion."""

from __future__ import annotations

import shutil

from conftest import seed_store
from prefect_cli import PREFECT, prefect, process_worker


def test_deployment_run_completes(prefect_server, tiny_teacher, tmp_path):
    env = prefect_server
    assert shutil.which(PREFECT)
    prefect(env, "work-pool", "create", "gemstill-process", "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--name", "distill/tiny")
    store = seed_store(tiny_teacher, tmp_path / "store")  # the run finds data and teacher done
    with process_worker(env, tmp_path / "worker.log"):
        run = prefect(env, "deployment", "run", "distill/tiny", "--param", f"store={store}", "--watch", timeout=900)
        assert "Completed" in run.stdout + run.stderr, run.stdout[-3000:]
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
