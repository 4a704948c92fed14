"""A real Prefect server on 127.0.0.1, deployments from prefect.yaml, a process worker, and
`prefect deployment run 'distill/tiny'` watched to completion."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def prefect_server(tmp_path):
    """A Prefect server with its own home (database) in tmp_path; yields the environment clients need."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        assert time.time() < deadline, "Prefect server did not become healthy in 120 s"
        time.sleep(0.5)
    yield env
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


def prefect(env, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


def test_deployment_run_completes(prefect_server, tmp_path):
    env = prefect_server
    assert shutil.which(PREFECT)
    prefect(env, "work-pool", "create", "gemstill-process", "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--name", "tiny")
    worker_log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "gemstill-process", "--limit", "1"],
        env=env,
        cwd=REPO,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        store = tmp_path / "store"
        run = prefect(env, "deployment", "run", "distill/tiny", "--param", f"store={store}", "--watch", timeout=900)
        assert "Completed" in run.stdout + run.stderr, run.stdout[-3000:]
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        worker_log.close()
    assert sorted(p.parent.parent.name for p in store.glob("*/*/manifest.json")) == [
        "evaluate",
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
