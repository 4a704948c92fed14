"""Pipeline machinery on small custom stages: validation, content keys, cache hits, refresh, only, retries, stores."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from gemstill.flows.distill import distill

from gemstill.errors import GemstillError
from gemstill.pipeline.plan import make_plan, run_stage
from gemstill.pipeline.spec import load_pipeline

CHAIN = """
name: chain
stages:
  source: {task: "pipeline_stages:source", reads: [data.seed]}
  double: {task: "pipeline_stages:double", needs: [source]}
  total: {task: "pipeline_stages:total", needs: [double]}
"""
PROFILE = """
name: machinery
pipeline: {pipeline}
store: {store}
teacher:
  scratch:
    architecture: {{num_layers: 2, embed_dim: 32, hidden_dim: 64, num_heads: 2, num_kv_heads: 1, head_dim: 16,
                   sliding_window: 8}}
"""


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A profile + pipeline pair in tmp_path, and the log the custom stages append their names to."""
    monkeypatch.setenv("GEMSTILL_TEST_LOG", str(tmp_path / "ran.log"))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    (tmp_path / "pipe.yaml").write_text(CHAIN)
    (tmp_path / "profile.yaml").write_text(PROFILE.format(pipeline=tmp_path / "pipe.yaml", store=tmp_path / "store"))
    return tmp_path


def ran(workspace: Path) -> list[str]:
    log = workspace / "ran.log"
    stages = log.read_text().split() if log.exists() else []
    log.unlink(missing_ok=True)
    return stages


def test_second_run_is_all_cache_hits(workspace):
    profile = str(workspace / "profile.yaml")
    first = distill(profile=profile)
    assert ran(workspace) == ["source", "double", "total"]
    assert first["total"]["metrics"] == {"total": 2 * sum(range(5))}
    second = distill(profile=profile)
    assert ran(workspace) == []
    assert all(result["cached"] for result in second.values())
    assert {k: v["key"] for k, v in first.items()} == {k: v["key"] for k, v in second.items()}


def test_refresh_recomputes_exactly_downstream(workspace):
    profile = str(workspace / "profile.yaml")
    distill(profile=profile)
    ran(workspace)
    result = distill(profile=profile, refresh=["double"])
    assert ran(workspace) == ["double", "total"]
    assert result["source"]["cached"] and not result["double"]["cached"]


def test_only_runs_one_stage_given_its_inputs(workspace):
    profile = str(workspace / "profile.yaml")
    with pytest.raises(GemstillError, match="needs source, not done"):
        distill(profile=profile, only="double")
    distill(profile=profile, only="source")
    assert ran(workspace) == ["source"]
    distill(profile=profile, only="double")
    assert ran(workspace) == ["double"]
    plan = make_plan(profile)
    assert [plan.state(s) for s in plan.stages] == ["done", "done", "missing"]


def test_keys_follow_content_not_runs(workspace):
    profile = str(workspace / "profile.yaml")
    base = make_plan(profile)
    assert {s.key for s in make_plan(profile).stages.values()} == {s.key for s in base.stages.values()}
    changed = make_plan(profile, overrides={"data.seed": "7"})
    assert all(changed.stages[s].key != base.stages[s].key for s in base.stages)  # source reads data.seed
    unrelated = make_plan(profile, overrides={"teacher_cache.k": "8"})  # no stage reads it
    assert all(unrelated.stages[s].key == base.stages[s].key for s in base.stages)
    distill(profile=profile)
    ran(workspace)
    assert [changed.state(s) for s in changed.stages] == ["stale", "stale", "stale"]
    distill(profile=profile, overrides={"data.seed": "7"})
    assert ran(workspace) == ["source", "double", "total"]


def test_transient_failure_is_retried(workspace):
    (workspace / "pipe.yaml").write_text(
        'name: flaky\nstages:\n  flaky: {task: "pipeline_stages:flaky", retries: {count: 2, backoff_seconds: 0.1}}\n'
    )
    result = distill(profile=str(workspace / "profile.yaml"))
    assert ran(workspace) == ["flaky", "flaky"]
    assert result["flaky"]["metrics"] == {"attempts": 2}


def test_bad_input_is_not_retried(workspace):
    (workspace / "pipe.yaml").write_text(
        'name: bad\nstages:\n  bad: {task: "pipeline_stages:bad_input", retries: {count: 3, backoff_seconds: 0.1}}\n'
    )
    with pytest.raises(GemstillError, match="injected bad input"):
        distill(profile=str(workspace / "profile.yaml"))
    assert ran(workspace) == ["bad"]
    assert make_plan(str(workspace / "profile.yaml")).state("bad") == "missing"


def test_remote_store_commits_files_then_manifest(workspace):
    """Any fsspec URL works as a store: here fsspec's in-memory filesystem stands in for a bucket."""
    profile = str(workspace / "profile.yaml")
    store = "memory://gemstill-test-store"
    plan = make_plan(profile, store=store)
    for name in plan.stages:
        run_stage(plan, name)
    assert [plan.state(s) for s in plan.stages] == ["done", "done", "done"]
    manifest = plan.store.manifest("double", plan.stages["double"].key)
    assert [f["path"] for f in manifest["files"]] == ["doubled.json"]
    fetched = plan.store.fetch("double", plan.stages["double"].key)
    assert json.loads((fetched / "doubled.json").read_text()) == [0, 2, 4, 6, 8]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nstages:\n  a: {task: t, needs: [b]}\n  b: {task: t, needs: [a]}\n", r"cycle \(a -> b -> a\)"),
        ("name: x\nstages:\n  a: {task: t, needs: [ghost]}\n", "needs names 'ghost', which is not a stage"),
        ("name: x\nstages:\n  a: {task: t, retry: 3}\n", "unknown key 'stages.a.retry'"),
        ("name: x\nstages:\n  a: {task: t, retries: {count: many}}\n", "key 'stages.a.retries.count'"),
        ("name: x\nstages: {}\n", "'stages' is empty"),
        ("name: x\nstages:\n  a: {task: t\n", "invalid YAML at line"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_invalid_pipeline_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(GemstillError, match=message) as error:
        load_pipeline(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {"seqlen": 64}}, "unknown key 'data.seqlen'"),
        ({"data": {"seq_len": "long"}}, "key 'data.seq_len'"),
        ({"teacher_cache": {"mode": "everything"}}, "key 'teacher_cache.mode'"),
        ({"hardware": {"mesh": {"pods": 2}}}, "hardware.mesh.pods"),
        ({"teacher": {"model": "nope:x"}}, "teacher"),
    ],
)
def test_invalid_profiles(workspace, change, message):
    import yaml

    data = yaml.safe_load((workspace / "profile.yaml").read_text())
    for section, value in change.items():
        if isinstance(value, dict) and isinstance(data.get(section), dict):
            data[section].update(value)
        else:
            data[section] = value
    path = workspace / "bad-profile.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(GemstillError, match=message) as error:
        make_plan(str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_shipped_profiles_validate_with_memory_estimates():
    """Every shipped profile validates; the TPU one (unreachable here) still gets per-stage memory estimates."""
    shipped = sorted(p.stem for p in (Path(__file__).parents[1] / "profiles").glob("*.yaml"))
    assert {"tiny", "gemma3-270m", "gemma3-4b-tpu-v5e"} <= set(shipped)
    plan = make_plan("gemma3-4b-tpu-v5e")
    assert plan.profile.hardware.platform == "tpu"
    memory = plan.stages["teacher_cache"].task.memory(plan.profile)
    assert 7.5e9 < memory["params"] < 8e9  # 3.88B text-decoder parameters in bfloat16
    assert memory["total"] < plan.profile.hardware.memory_per_device_gib * 2**30
    training = plan.stages["train_student"].task.memory(plan.profile)
    assert 0 < training["total"] < plan.profile.hardware.memory_per_device_gib * 2**30
    assert training["teacher"] > 0  # online teacher for the hidden-state term
    assert textwrap.dedent(plan.pipeline.description).strip()
    with pytest.raises(GemstillError, match="needs a TPU but this machine runs JAX on cpu"):
        run_stage(plan, "prepare_data")
    assert os.fspath(plan.pipeline_path).endswith("pipelines/distill.yaml")
