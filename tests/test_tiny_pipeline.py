"""The `tiny` profile end to end through the real CLI: a full run (distilled student vs baseline), cache hits,
status, cache stats, the report, and a run killed with SIGKILL in the middle of the teacher cache that resumes
to the same artifacts."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def gemstill(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gemstill", *args], capture_output=True, text=True, timeout=900, cwd=REPO, **kwargs
    )


def stage_dir(store: Path, stage: str) -> Path:
    (key_dir,) = [p for p in (store / stage).iterdir() if (p / "manifest.json").is_file()]
    return key_dir


def file_digests(directory: Path, pattern: str) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.glob(pattern))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted run of the tiny profile, timed."""
    store = tmp_path_factory.mktemp("tiny-store")
    began = time.perf_counter()
    result = gemstill("run", "tiny", "--store", str(store))
    seconds = time.perf_counter() - began
    assert result.returncode == 0, result.stderr[-3000:]
    return store, seconds, result


def test_full_run_then_all_cached(full_run):
    store, first_seconds, _ = full_run
    status = json.loads(gemstill("status", "tiny", "--store", str(store), "--json").stdout)
    assert [(s["stage"], s["state"]) for s in status["stages"]] == [
        ("prepare_data", "done"),
        ("pretrain_teacher", "done"),
        ("teacher_cache", "done"),
        ("layer_map", "done"),
        ("train_student", "done"),
        ("train_baseline", "done"),
        ("evaluate", "done"),
    ]
    manifests = {p.parent.parent.name: p.stat().st_mtime_ns for p in store.glob("*/*/manifest.json")}
    began = time.perf_counter()
    again = gemstill("run", "tiny", "--store", str(store))
    second_seconds = time.perf_counter() - began
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("cached") == 7
    assert {p.parent.parent.name: p.stat().st_mtime_ns for p in store.glob("*/*/manifest.json")} == manifests
    assert second_seconds < first_seconds / 2, (first_seconds, second_seconds)


def test_status_shows_stale_after_a_config_change(full_run):
    store, _, _ = full_run
    result = gemstill("status", "tiny", "--store", str(store), "--set", "teacher_cache.k=8", "--json")
    status = json.loads(result.stdout)
    states = {s["stage"]: s["state"] for s in status["stages"]}
    assert states == {
        "prepare_data": "done",
        "pretrain_teacher": "done",
        "teacher_cache": "stale",
        "layer_map": "done",  # reads no cache setting
        "train_student": "stale",
        "train_baseline": "done",  # cross-entropy only: independent of the teacher cache
        "evaluate": "stale",
    }


def test_distilled_student_beats_the_baseline(full_run):
    """The proof of the tiny profile: on held-out data the distilled student has lower NLL and lower KL to the
    teacher than a same-size student trained on the same data and steps with cross-entropy only."""
    store, _, _ = full_run
    result = gemstill("report", "tiny", "--store", str(store), "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["model"]: row for row in json.loads(result.stdout)}
    assert list(rows) == ["teacher", "student", "baseline"]
    assert rows["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert rows["student"]["val_nll"] < rows["baseline"]["val_nll"]
    assert rows["student"]["kl_to_teacher"] < rows["baseline"]["kl_to_teacher"]
    assert rows["student"]["parameters"] == rows["baseline"]["parameters"] < rows["teacher"]["parameters"]
    for row in rows.values():
        assert row["val_ppl"] == pytest.approx(2.718281828459045 ** row["val_nll"], rel=1e-9)
    evaluate = stage_dir(store, "evaluate")
    for name in ("report.md", "evaluation.png", "training_curves.png"):
        assert (evaluate / name).stat().st_size > 0
    assert (stage_dir(store, "layer_map") / "layer_map.png").stat().st_size > 0
    assert (stage_dir(store, "train_student") / "loss_curve.png").stat().st_size > 0


def test_cache_stats(full_run):
    store, _, _ = full_run
    result = gemstill("cache", "stats", "tiny", "--store", str(store), "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["split"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"train", "validation"}
    assert all(row["tokens"] > 0 and 0 < row["mean_kept_mass"] <= 1 for row in rows.values())


def test_sigkill_mid_teacher_cache_resumes_to_identical_artifacts(full_run, tmp_path):
    reference_store, _, _ = full_run
    store = tmp_path / "store"
    process = subprocess.Popen(
        [sys.executable, "-m", "gemstill", "run", "tiny", "--store", str(store)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while not list(store.glob("teacher_cache/*/shards/train/*.parquet")):
        assert process.poll() is None, "the run ended before the teacher cache wrote a shard"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not list(store.glob("teacher_cache/*/manifest.json")), "killed before finishing: not done"
    resumed = gemstill("run", "tiny", "--store", str(store), "--only", "teacher_cache")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours, reference = stage_dir(store, "teacher_cache"), stage_dir(reference_store, "teacher_cache")
    assert ours.name == reference.name
    assert file_digests(ours, "shards/**/*") == file_digests(reference, "shards/**/*")
