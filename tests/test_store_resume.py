"""Store-native resume: partial work reaches the store as it is made, so a stage killed under one working
directory (one machine) resumes under another from the shared store: on a local path, and on an fsspec
filesystem that is not the local disk (fsspec's in-memory one standing in for a bucket)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import fsspec
import pytest
from conftest import MACHINERY_PROFILE, TEACHER_STAGES, seed_store

from gemstill.pipeline.plan import make_plan, run_stage
from gemstill.pipeline.store import ArtifactStore

TESTS = Path(__file__).parent
PIPELINE = 'name: resumable\nstages:\n  work: {task: "pipeline_stages:resumable"}\n'
DRIVER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    from gemstill.pipeline.plan import make_plan, run_stage
    plan = make_plan({profile!r})
    print(json.dumps(run_stage(plan, "work")["metrics"]))
    """
)


class Killed(BaseException):
    """Stands in for SIGKILL inside one process: nothing catches it, nothing after it runs."""


def _machine(root: Path, name: str) -> dict[str, str]:
    """The environment of one machine: its own working directory and local cache (staging) directory."""
    (root / name).mkdir(exist_ok=True)
    return {**os.environ, "GEMSTILL_CACHE": str(root / name / "cache"), "GEMSTILL_TEST_LOG": str(root / "ran.log")}


def test_a_stage_killed_under_one_working_directory_resumes_under_another_local_store(tmp_path):
    (tmp_path / "pipe.yaml").write_text(PIPELINE)
    (tmp_path / "profile.yaml").write_text(
        MACHINERY_PROFILE.format(pipeline=tmp_path / "pipe.yaml", store=tmp_path / "shared-store")
    )
    script = DRIVER.format(tests=str(TESTS), profile=str(tmp_path / "profile.yaml"))
    machine_a = {**_machine(tmp_path, "a"), "GEMSTILL_TEST_FAIL": "work"}
    first = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path / "a", env=machine_a, capture_output=True, text=True
    )
    assert first.returncode != 0 and "killed after the first half" in first.stderr
    second = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path / "b", env=_machine(tmp_path, "b"), capture_output=True, text=True
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert json.loads(second.stdout.splitlines()[-1]) == {"resumed": True, "halves": 2}


def test_a_stage_killed_on_one_machine_resumes_on_another_over_fsspec(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMSTILL_TEST_LOG", str(tmp_path / "ran.log"))
    monkeypatch.syspath_prepend(str(TESTS))
    (tmp_path / "pipe.yaml").write_text(PIPELINE)
    url = f"memory://resume-{uuid.uuid4().hex}"
    (tmp_path / "profile.yaml").write_text(MACHINERY_PROFILE.format(pipeline=tmp_path / "pipe.yaml", store=url))
    plan = make_plan(str(tmp_path / "profile.yaml"))
    machine_a = dataclasses.replace(plan, store=ArtifactStore(url, staging_root=tmp_path / "a"))
    monkeypatch.setenv("GEMSTILL_TEST_FAIL", "work")
    with pytest.raises(RuntimeError, match="killed after the first half"):
        run_stage(machine_a, "work")
    monkeypatch.delenv("GEMSTILL_TEST_FAIL")
    assert not (tmp_path / "b").exists()
    machine_b = dataclasses.replace(plan, store=ArtifactStore(url, staging_root=tmp_path / "b"))
    assert run_stage(machine_b, "work")["metrics"] == {"resumed": True, "halves": 2}


def _upload(local_store: Path, url: str) -> None:
    fs, base = fsspec.core.url_to_fs(url)
    for stage in TEACHER_STAGES:
        for file in (local_store / stage).rglob("*"):
            if file.is_file():
                fs.pipe_file(f"{base}/{file.relative_to(local_store)}", file.read_bytes())


def test_a_teacher_cache_killed_after_one_shard_resumes_on_another_machine(tiny_teacher, tmp_path, monkeypatch):
    """The real teacher_cache stage on a remote store: killed right after its first shard reached the store, then
    run on a machine with an empty local disk, it computes only the missing shards, and every shard is
    byte-identical to an uninterrupted run's."""
    reference = make_plan("tiny", store=str(seed_store(tiny_teacher, tmp_path / "local")))
    run_stage(reference, "teacher_cache")
    expected = reference.store.manifest("teacher_cache", reference.stages["teacher_cache"].key)["files"]

    url = f"memory://resume-{uuid.uuid4().hex}"
    _upload(tiny_teacher, url)
    plan = make_plan("tiny", store=url)
    persisted: list[str] = []
    real_persist = ArtifactStore.persist

    def killed_after_the_first_shard(self, stage, key, refresh, path):
        real_persist(self, stage, key, refresh, path)
        persisted.append(Path(path).name)
        if Path(path).name == "catalog.duckdb":
            raise Killed

    monkeypatch.setattr(ArtifactStore, "persist", killed_after_the_first_shard)
    with pytest.raises(Killed):
        run_stage(dataclasses.replace(plan, store=ArtifactStore(url, staging_root=tmp_path / "a")), "teacher_cache")
    monkeypatch.undo()
    assert persisted[-1] == "catalog.duckdb" and persisted[0].endswith(".parquet")

    logs: list[str] = []
    machine_b = dataclasses.replace(plan, store=ArtifactStore(url, staging_root=tmp_path / "b"))
    manifest = run_stage(machine_b, "teacher_cache", log=logs.append)
    assert any("train: 1 of" in line and "already cached" in line for line in logs), logs
    assert manifest["metrics"]["computed_shards"] == manifest["metrics"]["shards"] - 1
    shards = lambda files: {f["path"]: f["sha256"] for f in files if f["path"].startswith("shards/")}  # noqa: E731
    assert shards(manifest["files"]) == shards(expected)


def test_training_killed_after_a_checkpoint_resumes_from_it_on_another_machine(tiny_teacher, tmp_path, monkeypatch):
    """train_baseline on a remote store: killed once its first checkpoint (step 20 of 40) reached the store, it
    resumes on a machine with an empty local disk from that checkpoint, and ends where an uninterrupted run ends."""
    reference = make_plan("tiny", store=str(seed_store(tiny_teacher, tmp_path / "local")))
    for name in ("layer_map", "train_baseline"):
        run_stage(reference, name)
    expected = reference.store.manifest("train_baseline", reference.stages["train_baseline"].key)["metrics"]

    url = f"memory://resume-{uuid.uuid4().hex}"
    _upload(tiny_teacher, url)
    plan = make_plan("tiny", store=url)
    run_stage(dataclasses.replace(plan, store=ArtifactStore(url, staging_root=tmp_path / "a")), "layer_map")
    real_persist = ArtifactStore.persist

    def killed_after_the_first_checkpoint(self, stage, key, refresh, path):
        real_persist(self, stage, key, refresh, path)
        if Path(path).name == "checkpoints":
            raise Killed

    monkeypatch.setattr(ArtifactStore, "persist", killed_after_the_first_checkpoint)
    with pytest.raises(Killed):
        run_stage(dataclasses.replace(plan, store=ArtifactStore(url, staging_root=tmp_path / "a")), "train_baseline")
    monkeypatch.undo()
    logs: list[str] = []
    machine_b = dataclasses.replace(plan, store=ArtifactStore(url, staging_root=tmp_path / "b"))
    manifest = run_stage(machine_b, "train_baseline", log=logs.append)
    assert any("resuming from step 20" in line for line in logs), logs
    assert manifest["metrics"]["final_train_loss"] == pytest.approx(expected["final_train_loss"], rel=1e-5)
    assert manifest["metrics"]["validation_loss"] == pytest.approx(expected["validation_loss"], rel=1e-5)
