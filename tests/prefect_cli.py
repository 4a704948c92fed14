"""A real Prefect server on 127.0.0.1 for tests, the `prefect` CLI against it, and a process worker."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
PREFECT_CLI = [sys.executable, "-m", "prefect"]  # the same CLI, run by this interpreter


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(directory: Path) -> Iterator[dict[str, str]]:
    """A Prefect server with its own home (database) in `directory`; yields the environment clients need."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(directory / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    log_path = directory / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [*PREFECT_CLI, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                assert server.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, "Prefect server did not become healthy in 120 s"
                time.sleep(0.5)
            yield env
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def prefect(env: dict[str, str], *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*PREFECT_CLI, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, (
            f"prefect {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )
    return result


@contextlib.contextmanager
def process_worker(
    env: dict[str, str], log_path: Path, pool: str = "gemstill-process", limit: int | None = 1
) -> Iterator[None]:
    """A process worker on `pool` running at most `limit` flow runs at a time, stopped on exit."""
    with log_path.open("w") as log:
        worker = subprocess.Popen(
            [*PREFECT_CLI, "worker", "start", "--pool", pool, *(["--limit", str(limit)] if limit else [])],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield
        finally:  # a loaded machine can take longer than the grace period to shut a worker down
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=30)


_TASK_STATES = """
import json, re, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
with get_client(sync_client=True) as client:
    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[sys.argv[1]])))
print(json.dumps({r.name.rsplit("-", 1)[0]: r.state.name for r in runs}))
"""


_FLOW_RUNS = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[sys.argv[1]])))
    print(json.dumps([
        {
            "id": str(r.id), "state": r.state.name, "run_count": r.run_count, "work_pool": r.work_pool_name,
            "job_variables": r.job_variables, "parameters": r.parameters,
            "parent_task_run": str(r.parent_task_run_id) if r.parent_task_run_id else None,
            "history": [s.name for s in states], "crashes": [s.message for s in states if s.name == "Crashed"],
        }
        for r in runs
        for states in [sorted(client.read_flow_run_states(r.id), key=lambda s: s.timestamp)]
    ]))
"""


def flow_runs(env: dict[str, str], flow: str) -> list[dict]:
    """Every flow run of the flow named `flow`: state, run count, pool, job variables, parameters, parent task
    run, the names of its states in order and the messages of its Crashed states, read from the server's API."""
    import json

    result = subprocess.run(
        [sys.executable, "-c", _FLOW_RUNS, flow], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def kill_flow_run_process(flow_run: str) -> int:
    """SIGKILL the process a worker started for `flow_run` (as the OOM killer would); returns its pid."""
    import psutil

    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get("PREFECT__FLOW_RUN_ID") == flow_run:
                process.kill()
                return process.pid
    raise AssertionError(f"no process runs flow run {flow_run}")


def flow_run_id(output: str) -> str:
    """The flow run id `prefect deployment run` prints."""
    import re

    match = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert match, output[-2000:]
    return match.group(1)


TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def deployment_run(env: dict[str, str], deployment: str, *args: str, timeout: float = 600) -> tuple[str, str]:
    """`prefect deployment run` without `--watch`, then the flow run's state read from the REST API until it is
    final: (flow run id, state name). `--watch` follows the run through the server's event stream, which a busy
    SQLite server can drop ("database is locked" while flushing events): the CLI then waits out its timeout on a
    run long Completed."""
    import json

    started = prefect(env, "deployment", "run", deployment, *args)
    run = flow_run_id(started.stdout)
    deadline = time.time() + timeout
    while True:
        with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/flow_runs/{run}", timeout=30) as response:
            state = json.loads(response.read())["state"]
        if state and state["type"] in TERMINAL:
            return run, state["name"]
        assert time.time() < deadline, f"flow run {run} of {deployment} not final after {timeout:.0f} s: {state}"
        time.sleep(3)


def task_run_states(env: dict[str, str], flow_run: str) -> dict[str, str]:
    """{task run name without its suffix: state name} of one flow run, read from the server's API."""
    import json

    result = subprocess.run(
        [sys.executable, "-c", _TASK_STATES, flow_run], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


_ARTIFACTS = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
runs = ArtifactFilterFlowRunId(any_=sys.argv[1:])
with get_client(sync_client=True) as client:
    found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=runs))
print(json.dumps([{"key": a.key, "type": a.type, "data": a.data} for a in found]))
"""


def flow_run_artifacts(env: dict[str, str], *flow_runs: str) -> list[dict]:
    """Every artifact the flow runs made (key, type, data), read from the server's API."""
    import json

    result = subprocess.run(
        [sys.executable, "-c", _ARTIFACTS, *flow_runs], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)
