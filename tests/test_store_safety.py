"""Safe recompute: a refresh builds beside the committed result and swaps on commit, a swap cut short is finished
by the next reader, and a lease keeps two runs of one key from writing it at once (a dead holder's is taken over).

The stages are the small custom ones of pipeline_stages.py, run through gemstill.pipeline.plan (no Prefect): the
store's behaviour, on a local directory and on fsspec's in-memory filesystem standing in for a bucket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from conftest import MACHINERY_PROFILE

from gemstill.errors import GemstillError
from gemstill.pipeline import lease as lease_module
from gemstill.pipeline.plan import make_plan, run_stage
from gemstill.pipeline.store import ArtifactStore

TESTS = Path(__file__).parent
PIPELINE = """
name: refreshable
stages:
  source: {task: "pipeline_stages:source", reads: [data.seed]}
  double: {task: "pipeline_stages:halting", needs: [source], reads: [data.seed]}
"""


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMSTILL_TEST_LOG", str(tmp_path / "ran.log"))
    monkeypatch.syspath_prepend(str(TESTS))
    (tmp_path / "pipe.yaml").write_text(PIPELINE)
    return tmp_path


def _profile(root: Path, store: str) -> str:
    (root / "profile.yaml").write_text(MACHINERY_PROFILE.format(pipeline=root / "pipe.yaml", store=store))
    return str(root / "profile.yaml")


def _run_all(profile: str, refresh: set[str] = frozenset()) -> None:
    plan = make_plan(profile)
    for name in plan.stages:
        if name in refresh or plan.store.manifest(name, plan.stages[name].key) is None:
            run_stage(plan, name, fresh=name in refresh)


def _doubled(profile: str) -> list[int]:
    plan = make_plan(profile)
    directory = plan.store.fetch("double", plan.stages["double"].key)  # verifies every file's sha256
    return json.loads((directory / "doubled.json").read_text())


@pytest.mark.parametrize("store", ["local", "memory"])
def test_a_failing_refresh_leaves_the_previous_artifact_intact(workspace, monkeypatch, store):
    root = str(workspace / "store") if store == "local" else f"memory://safety-{uuid.uuid4().hex}"
    profile = _profile(workspace, root)
    _run_all(profile)
    good = _doubled(profile)
    monkeypatch.setenv("GEMSTILL_TEST_FAIL", "double")
    with pytest.raises(RuntimeError, match="injected failure"):
        _run_all(profile, refresh={"double"})
    plan = make_plan(profile)
    assert plan.state("double") == "done"
    assert _doubled(profile) == good  # same bytes, checksums verified
    monkeypatch.delenv("GEMSTILL_TEST_FAIL")
    before_refresh = time.time()
    _run_all(profile, refresh={"double"})
    assert _doubled(profile) == good  # recomputed (same inputs, same result) and swapped in
    manifest = plan.store.manifest("double", plan.stages["double"].key)
    assert manifest["started_at"] >= before_refresh  # the committed run is the refresh, however slow the machine
    if store == "local":
        names = sorted(p.name for p in (workspace / "store" / "double").iterdir())
        assert names == [plan.stages["double"].key]  # no .refresh, .old or .lease left behind


def test_a_swap_cut_short_is_finished_by_the_next_run_of_the_stage(workspace, monkeypatch):
    profile = _profile(workspace, str(workspace / "store"))
    _run_all(profile)
    monkeypatch.setattr(ArtifactStore, "_finish_swap", lambda self, stage, key: None)  # "killed" right after
    monkeypatch.setenv("GEMSTILL_TEST_SLEEP", "0")
    plan = make_plan(profile)
    run_stage(plan, "double", fresh=True)
    key = plan.stages["double"].key
    refresh = workspace / "store" / "double" / f"{key}.refresh"
    assert (refresh / "manifest.json").is_file()
    monkeypatch.undo()
    monkeypatch.setenv("GEMSTILL_TEST_LOG", str(workspace / "ran.log"))
    monkeypatch.syspath_prepend(str(TESTS))
    fresh = ArtifactStore(str(workspace / "store"))
    assert fresh.manifest("double", key) is not None and refresh.is_dir()  # a reader moves nothing
    ran = (workspace / "ran.log").read_text()
    run_stage(make_plan(profile), "double")  # the next run of the stage, under its lease, finishes the swap
    assert not refresh.exists()
    assert (workspace / "ran.log").read_text() == ran  # nothing recomputed: the refresh was committed already
    assert json.loads((fresh.fetch("double", key) / "doubled.json").read_text()) == [0, 2, 4, 6, 8]


def test_a_dead_runs_lease_is_taken_over(workspace, monkeypatch):
    profile = _profile(workspace, str(workspace / "store"))
    plan = make_plan(profile)
    run_stage(plan, "source")
    key = plan.stages["double"].key
    lease_path = plan.store.lease_path("double", key)
    dead = {"owner": "crashed-host:4242:deadbeef", "heartbeat_at": time.time() - 300, "expires_at": time.time() + 1.5}
    Path(lease_path).write_text(json.dumps(dead))
    logged: list[str] = []
    started = time.monotonic()
    run_stage(plan, "double", log=logged.append)
    assert time.monotonic() - started >= 1.0  # waited for the lease to expire, then took it over
    assert any("waiting" in line for line in logged)
    assert any("taking over the stale lease of crashed-host:4242:deadbeef" in line for line in logged)
    assert plan.state("double") == "done" and not Path(lease_path).exists()


def test_a_live_lease_is_refused_with_one_line_after_the_wait(workspace, monkeypatch):
    profile = _profile(workspace, str(workspace / "store"))
    plan = make_plan(profile)
    path = plan.store.lease_path("source", plan.stages["source"].key)
    monkeypatch.setenv("GEMSTILL_LEASE_SECONDS", "30")
    holder = lease_module.acquire(plan.store.fs, path, "stage source")
    try:
        with pytest.raises(GemstillError, match=r"is being computed by .*; wait for that run") as err:
            lease_module.acquire(plan.store.fs, path, "stage source", wait_s=0.5)
        assert "\n" not in str(err.value)
    finally:
        holder.release()
    assert not Path(path).exists()


DRIVER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from gemstill.pipeline.plan import make_plan, run_stage
    plan = make_plan({profile!r})
    for name in plan.stages:
        if plan.store.manifest(name, plan.stages[name].key) is None:
            run_stage(plan, name)
    """
)


def test_two_concurrent_runs_of_one_profile_do_not_corrupt_each_other(workspace):
    """Both runs start at once on one store: each stage is computed once, the other run waits and uses it."""
    profile = _profile(workspace, str(workspace / "store"))
    env = {**os.environ, "GEMSTILL_TEST_LOG": str(workspace / "ran.log"), "GEMSTILL_TEST_SLEEP": "3"}
    script = DRIVER.format(tests=str(TESTS), profile=profile)
    runs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300)[0].decode() for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert sorted((workspace / "ran.log").read_text().split()) == ["double", "source"]  # each computed once
    assert any("using it" in out for out in outputs)  # the second run waited, then found the key done
    assert _doubled(profile) == [0, 2, 4, 6, 8]
