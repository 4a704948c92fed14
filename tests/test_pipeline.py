"""Pipeline machinery on small custom stages: validation, content keys, cache hits, refresh, only, retries, stores."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from conftest import MACHINERY_PROFILE
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


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A profile + pipeline pair in tmp_path, and the log the custom stages append their names to."""
    monkeypatch.setenv("GEMSTILL_TEST_LOG", str(tmp_path / "ran.log"))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    (tmp_path / "pipe.yaml").write_text(CHAIN)
    (tmp_path / "profile.yaml").write_text(
        MACHINERY_PROFILE.format(pipeline=tmp_path / "pipe.yaml", store=tmp_path / "store")
    )
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


def test_a_stage_reads_only_the_settings_its_key_covers(workspace):
    """A stage sees the profile through a view of its declared reads: reading another setting fails at once,
    one line naming the stage, the setting and the fix; declared, the same stage runs and its key covers it."""
    profile = str(workspace / "profile.yaml")
    (workspace / "pipe.yaml").write_text('name: x\nstages:\n  peek: {task: "pipeline_stages:undeclared"}\n')
    plan = make_plan(profile)
    with pytest.raises(GemstillError) as error:
        run_stage(plan, "peek")
    assert str(error.value) == (
        "stage peek read the setting 'teacher_cache.k', which its cache key does not cover; add 'teacher_cache.k' "
        "to the reads of task pipeline_stages:undeclared"
    )
    assert plan.state("peek") == "missing"
    (workspace / "pipe.yaml").write_text(
        'name: x\nstages:\n  peek: {task: "pipeline_stages:undeclared", reads: [teacher_cache.k]}\n'
    )
    assert run_stage(make_plan(profile), "peek")["metrics"] == {"k": 64}
    assert make_plan(profile, overrides={"teacher_cache.k": 8}).state("peek") == "stale"


def test_the_profile_view_lets_through_exactly_what_is_declared():
    from gemstill.pipeline.context import view
    from gemstill.pipeline.profile import load_profile

    profile, _ = load_profile("tiny")
    seen = view(profile, ("teacher.scratch", "data.seq_len", "qat"), "s", "t")
    assert seen.teacher.scratch is profile.teacher.scratch  # a declared section: the real object, methods too
    assert seen.teacher.scratch.gemma_config().num_layers == profile.teacher.scratch.gemma_config().num_layers
    assert seen.data.seq_len == 128 and seen.qat.training_config(profile.training).steps > 0
    for read, setting in ((lambda: seen.data.seed, "data.seed"), (lambda: seen.teacher.model, "teacher.model")):
        with pytest.raises(GemstillError, match=f"read the setting '{setting}', which its cache key does not cover"):
            read()
    with pytest.raises(GemstillError, match="'model_dump' of its profile, which is not a setting"):
        seen.model_dump()
    with pytest.raises(GemstillError, match="a profile is read-only"):
        seen.name = "other"


def test_every_shipped_stage_validates_and_estimates_through_its_view():
    """The built-in tasks' validation and memory estimates read only what their keys cover, for every shipped
    profile and pipeline (the tiny pipeline tests run every stage function itself under its view)."""
    from gemstill.shipped import search_dirs

    for path in sorted({p.name: p for d in search_dirs("profiles") for p in d.glob("*.yaml")}.values()):
        for pipeline in (None, "from-scratch-cot") if path.stem == "tiny" else (None,):
            plan = make_plan(str(path), pipeline, store="memory://views", inspect=True)
            for name in plan.stages:
                plan.memory(name)


def test_a_stage_past_its_timeout_ends_timed_out_with_its_partial_work_kept(workspace):
    """timeout_seconds is enforced in the worker thread Prefect runs the stage in, even when the stage never
    reports: the task run ends TimedOut within seconds, its partial work stays uncommitted for a rerun."""
    import time

    (workspace / "pipe.yaml").write_text(
        'name: x\nstages:\n  slow: {task: "pipeline_stages:stalling", timeout_seconds: 2}\n'
    )
    profile = str(workspace / "profile.yaml")
    began = time.monotonic()
    state = distill(profile=profile, return_state=True)
    assert time.monotonic() - began < 30
    assert state.is_failed()
    (run,) = _task_runs(state.state_details.flow_run_id).values()
    assert run.state.name == "TimedOut", run.state
    assert "ran past its timeout of 2 s" in run.state.message
    plan = make_plan(profile)
    workdir = plan.store.work_dir("slow", plan.stages["slow"].key, refresh=False)
    assert (workdir / "partial.json").read_text() == "[1, 2]" and plan.state("slow") == "missing"


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
        ("name: x\nstages:\n  a: {task: t, job_variables: {env: {A: b}}}\n", "job_variables .* set work_pool too"),
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
    with pytest.raises(GemstillError, match=r"data\.files\.paths: no file matches '/mnt/data/instructions/\*\.jsonl'"):
        make_plan("gemma3-4b-tpu-v5e")  # its corpus lives on the TPU hosts: a plan to run refuses it here
    plan = make_plan("gemma3-4b-tpu-v5e", inspect=True)
    assert plan.profile.hardware.platform == "tpu"
    memory = plan.memory("teacher_cache")  # through the stage's own view of the profile
    assert 7.5e9 < memory["params"] < 8e9  # 3.88B text-decoder parameters in bfloat16
    assert memory["total"] < plan.profile.hardware.memory_per_device_gib * 2**30
    training = plan.memory("train_student")
    assert 0 < training["total"] < plan.profile.hardware.memory_per_device_gib * 2**30
    assert training["teacher"] > 0  # online teacher for the hidden-state term
    assert textwrap.dedent(plan.pipeline.description).strip()
    with pytest.raises(GemstillError, match="needs a TPU but this machine runs JAX on cpu"):
        run_stage(plan, "prepare_data")
    assert os.fspath(plan.pipeline_path).endswith("pipelines/distill.yaml")


def test_student_layer_types_from_the_teacher_need_a_teacher_init():
    with pytest.raises(GemstillError, match=r"student\.layer_types: teacher .* needs student\.init: teacher"):
        make_plan("tiny", overrides={"student.init": "random", "student.layer_types": "teacher"})
    with pytest.raises(GemstillError, match=r"layer_map\.compare_init .* needs student\.init: teacher"):
        make_plan("tiny", overrides={"student.init": "random"})  # the tiny profile compares inits
    plan = make_plan("tiny", overrides={"student.layer_types": "teacher"})  # a setting of the student: in its key
    assert plan.stages["train_student"].key != make_plan("tiny").stages["train_student"].key


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None):
    import subprocess
    import sys

    command = [sys.executable, "-m", "gemstill", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_cli_errors_are_one_plain_line(tmp_path):
    """Messages print as written (no markup: brackets survive, `[/` cannot crash the printer), a malformed --set
    value is named, and a stage failing on bad input under `gemstill run` shows no traceback on the terminal."""
    repo = Path(__file__).resolve().parents[1]
    unknown = _cli("status", "tiny", "--store", str(tmp_path), "--set", "a[/b=1", cwd=repo)
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert unknown.stderr.strip().splitlines()[-1].endswith("unknown key 'a[/b'; remove it or fix its spelling")
    malformed = _cli("status", "tiny", "--store", str(tmp_path), "--set", "training.steps=[1", cwd=repo)
    assert malformed.returncode == 1 and "Traceback" not in malformed.stderr
    assert "error: override 'training.steps': '[1' is not a YAML value" in malformed.stderr
    missing = tmp_path / "missing.jsonl"
    stage = _cli(
        "run", "tiny", "--store", str(tmp_path / "store"), "--set", "data.source=files",
        "--set", f"data.files={{paths: ['{missing}']}}", cwd=repo,
    )  # fmt: skip
    assert stage.returncode == 1
    assert "Traceback" not in stage.stderr, stage.stderr[-2000:]
    last = stage.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(missing) in last, last


def test_a_stage_that_crashes_under_gemstill_run_is_one_line_with_the_traceback_in_the_log(workspace):
    """Not bad input but a bug (a RuntimeError inside a stage): the terminal still shows one line, naming the
    log file that holds the traceback."""
    (workspace / "pipe.yaml").write_text(DIAMOND)
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parent),
        "GEMSTILL_TEST_FAIL": "left",
        "GEMSTILL_CACHE": str(workspace / "cache"),
    }
    result = _cli("run", str(workspace / "profile.yaml"), cwd=workspace, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: RuntimeError: injected failure halfway through (the traceback is in "), last
    log_file = Path(last.rsplit("the traceback is in ", 1)[1].rstrip(")"))
    assert "Traceback (most recent call last)" in log_file.read_text()


def test_profiles_are_found_in_the_environment_the_working_directory_then_the_package(tmp_path, monkeypatch):
    from gemstill.pipeline.profile import resolve_profile_path
    from gemstill.shipped import resolve_problem_file

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    assert resolve_profile_path("tiny").read_bytes() == (repo / "profiles" / "tiny.yaml").read_bytes()
    assert resolve_problem_file("problems/game24.jsonl").read_bytes() == (repo / "problems/game24.jsonl").read_bytes()
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "tiny.yaml").write_text("name: mine\n")
    assert resolve_profile_path("tiny") == tmp_path / "profiles" / "tiny.yaml"  # the project's own comes first
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "tiny.yaml").write_text("name: ours\n")
    monkeypatch.setenv("GEMSTILL_PROFILES", str(ours))
    assert resolve_profile_path("tiny") == ours / "tiny.yaml"
    with pytest.raises(GemstillError, match=r"no profile 'nope': nope.yaml is in none of .*GEMSTILL_PROFILES"):
        resolve_profile_path("nope")


def test_a_non_editable_install_runs_from_another_directory(tmp_path):
    """`pip install .` (a wheel, not editable) carries the profiles, pipelines and problem files: from a directory
    with none of them, a profile plans (the 270M one resolves its shipped problem file) and a stage runs."""
    import site
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(repo), "-w", str(tmp_path)], check=True)
    (wheel,) = tmp_path.glob("gemstill-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    target = subprocess.run(
        [python, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True, check=True
    ).stdout.strip()
    # the test environment's dependencies, but not its editable gemstill (a .pth inside a path entry never runs)
    (Path(target) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([*pip, "install", "--no-deps", "--target", target, str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def gemstill(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [python, "-m", "gemstill", *args], cwd=elsewhere, capture_output=True, text=True, timeout=300
        )

    where = subprocess.run(
        [python, "-c", "import gemstill; print(gemstill.__file__)"], cwd=elsewhere, capture_output=True, text=True
    )
    assert where.stdout.startswith(target), where.stdout + where.stderr
    status = gemstill("status", "gemma3-270m", "--store", str(elsewhere / "store"), "--json")
    assert status.returncode == 0, status.stderr[-2000:]
    assert json.loads(status.stdout)["pipeline"] == "distill"
    run = gemstill("run", "tiny", "--only", "prepare_data", "--store", str(elsewhere / "store"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert list((elsewhere / "store" / "prepare_data").glob("*/manifest.json"))


def test_a_task_refuses_a_key_that_changed_since_the_flow_planned_it(workspace, monkeypatch):
    """The flow plans once; each task re-plans on its worker. If the two keys differ (code, profile, data or
    teacher changed mid-run, or differ on that worker), the task fails at once with one line, not retried."""
    import dataclasses

    import gemstill.flows.distill as flow_module

    real = flow_module.make_plan

    def drifted(*args, **kwargs):
        plan = real(*args, **kwargs)
        stage = dataclasses.replace(plan.stages["double"], key="0123456789abcdef")
        return dataclasses.replace(plan, stages={**plan.stages, "double": stage})

    monkeypatch.setattr(flow_module, "make_plan", drifted)
    with pytest.raises(GemstillError, match=r"stage double: its key here is .* but the flow planned 0123456789abcdef"):
        distill(profile=str(workspace / "profile.yaml"))
    assert ran(workspace) == ["source"]


DIAMOND = """
name: diamond
stages:
  source: {task: "pipeline_stages:source", reads: [data.seed]}
  left: {task: "pipeline_stages:halting", needs: [source], reads: [data.seed]}
  right: {task: "pipeline_stages:halting", needs: [source], reads: [data.seed]}
"""


def _task_runs(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.split("-")[0]: run for run in runs}


def _artifact(key: str, flow_run_id):
    """The artifact of that key made in that flow run (earlier runs and tests may have made one of the same key)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            ),
            sort=ArtifactSort.CREATED_DESC,
        )
    assert found, f"no artifact {key} in flow run {flow_run_id}"
    return found[0]


@pytest.mark.parametrize("concurrent", [1, 2])
def test_stages_are_task_runs_with_edges_that_overlap_when_allowed(workspace, monkeypatch, concurrent):
    """Every stage is a task run tagged with its stage, waiting on the stages it needs (the UI's edges);
    independent ones overlap when hardware.concurrent_stages allows; a second run shows them all Cached."""
    monkeypatch.setenv("GEMSTILL_TEST_SLEEP", "2")
    if concurrent == 2:  # each waits for the other to start: they overlap only if both run at once
        (workspace / "meet").mkdir()
        monkeypatch.setenv("GEMSTILL_TEST_MEET", f"{workspace / 'meet'},2")
    (workspace / "pipe.yaml").write_text(DIAMOND)
    profile = str(workspace / "profile.yaml")
    overrides = {"hardware.concurrent_stages": concurrent}
    state = distill(profile=profile, overrides=overrides, return_state=True)
    plan = make_plan(profile, overrides=overrides)
    spans = {
        name: (m["started_at"], m["finished_at"])
        for name in ("left", "right")
        if (m := plan.store.manifest(name, plan.stages[name].key))
    }
    overlap = min(spans["left"][1], spans["right"][1]) - max(spans["left"][0], spans["right"][0])
    assert (overlap > 1.0) if concurrent == 2 else (overlap < 0), spans
    runs = _task_runs(state.state_details.flow_run_id)
    assert sorted(runs) == ["stage:left", "stage:right", "stage:source"]
    assert "stage:left" in runs["stage:left"].tags and "task:pipeline_stages:halting" in runs["stage:left"].tags
    source_id = runs["stage:source"].id
    for name in ("stage:left", "stage:right"):
        assert [i.id for i in runs[name].task_inputs["request"]] == [source_id]  # submitted once source completed
    assert (
        _artifact("machinery-left-progress", state.state_details.flow_run_id).data == 100.0
    )  # the stage reported its progress to the end
    again = distill(profile=profile, overrides=overrides, return_state=True)
    assert {name: run.state.name for name, run in _task_runs(again.state_details.flow_run_id).items()} == {
        "stage:left": "Cached",
        "stage:right": "Cached",
        "stage:source": "Cached",
    }


def test_after_a_failure_a_rerun_runs_only_the_failed_stage(workspace, monkeypatch):
    """A stage fails halfway: its sibling still commits and what needs it never starts; run again (a flow-run
    retry does the same) and only the failed stage and its downstream run, every other is a Cached task run."""
    (workspace / "pipe.yaml").write_text(DIAMOND + '  last: {task: "pipeline_stages:after_left", needs: [left]}\n')
    profile = str(workspace / "profile.yaml")
    monkeypatch.setenv("GEMSTILL_TEST_FAIL", "left")
    with pytest.raises(RuntimeError, match="injected failure"):
        distill(profile=profile)
    assert sorted(ran(workspace)) == ["left", "right", "source"]
    monkeypatch.delenv("GEMSTILL_TEST_FAIL")
    state = distill(profile=profile, return_state=True)
    assert ran(workspace) == ["left", "last"]
    states = {name: run.state.name for name, run in _task_runs(state.state_details.flow_run_id).items()}
    assert states == {
        "stage:left": "Completed",
        "stage:last": "Completed",
        "stage:right": "Cached",
        "stage:source": "Cached",
    }


def test_a_stage_on_a_work_pool_runs_here_outside_a_deployment_and_keeps_its_key(workspace):
    """work_pool and job_variables say where a stage runs, not what it computes: the key stays, and a run that
    is not a deployment run (gemstill run, a flow called in-process) runs the stage in its own process."""
    profile = str(workspace / "profile.yaml")
    before = make_plan(profile).stages["double"].key
    pooled = CHAIN.replace("needs: [source]}", 'needs: [source], work_pool: big, job_variables: {env: {A: "1"}}}')
    (workspace / "pipe.yaml").write_text(pooled)
    assert make_plan(profile).stages["double"].key == before
    distill(profile=profile)
    assert ran(workspace) == ["source", "double", "total"]


def test_a_work_pool_without_its_stage_deployment_is_one_line_naming_the_command(workspace):
    from gemstill.tasks.stages import run_stage_on_pool

    from gemstill.pipeline.request import StageRequest

    request = StageRequest(profile=str(workspace / "profile.yaml"), stage="source", planned_key="k")
    with pytest.raises(GemstillError, match=r"no deployment gemstill-stage/big; deploy one: prefect deploy") as error:
        run_stage_on_pool.fn("big", {}, request)
    assert "\n" not in str(error.value)
