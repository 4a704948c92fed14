"""A deployment run (restricted plan) uses only the profiles, pipelines and task modules its worker is configured
with; a run started by hand trusts its caller."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemstill.errors import GemstillError
from gemstill.pipeline.plan import make_plan

EVIL_MODULE = """
from pathlib import Path
Path(__file__).with_name("imported.marker").write_text("module code ran")
def run(ctx):
    return {}
"""
PIPELINE = 'name: custom\nstages:\n  run: {task: "evil_stages:run"}\n'


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """A custom pipeline and task module in a directory no configured path covers."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil_stages.py").write_text(EVIL_MODULE)
    (tmp_path / "custom.yaml").write_text(PIPELINE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("GEMSTILL_PIPELINES", raising=False)
    monkeypatch.delenv("GEMSTILL_PROFILES", raising=False)
    monkeypatch.delenv("GEMSTILL_TASK_MODULES", raising=False)
    return tmp_path


def test_shipped_profiles_and_pipelines_plan_in_a_deployment_run(outside):
    plan = make_plan("tiny", store=str(outside / "store"), restricted=True)
    assert "train_student" in plan.stages
    make_plan("tiny", pipeline="from-scratch-cot", store=str(outside / "store"), restricted=True)


def test_a_pipeline_outside_the_configured_directories_is_refused(outside):
    with pytest.raises(GemstillError, match=r"pipeline .*custom.yaml is outside the configured directories") as err:
        make_plan("tiny", pipeline=str(outside / "custom.yaml"), restricted=True)
    assert "\n" not in str(err.value)
    with pytest.raises(GemstillError, match="outside the configured directories"):  # via the profile, too
        make_plan("tiny", overrides={"pipeline": str(outside / "custom.yaml")}, restricted=True)
    profile = outside / "mine.yaml"
    profile.write_text((Path(__file__).parents[1] / "profiles" / "tiny.yaml").read_text())
    with pytest.raises(GemstillError, match=r"profile .*mine.yaml is outside the configured directories"):
        make_plan(str(profile), restricted=True)
    assert not (outside / "imported.marker").exists()


def test_custom_task_modules_need_the_workers_allow_list(outside, monkeypatch):
    monkeypatch.setenv("GEMSTILL_PIPELINES", str(outside))  # the worker's own directory: the file is allowed
    with pytest.raises(GemstillError, match=r"task 'evil_stages:run' is refused: .* set GEMSTILL_TASK_MODULES"):
        make_plan("tiny", pipeline=str(outside / "custom.yaml"), restricted=True)
    assert not (outside / "imported.marker").exists()  # refused before its module was imported
    monkeypatch.setenv("GEMSTILL_TASK_MODULES", "other_stages, evil_stages")
    plan = make_plan("tiny", pipeline=str(outside / "custom.yaml"), restricted=True)
    assert list(plan.stages) == ["run"] and (outside / "imported.marker").exists()


def test_a_run_started_by_hand_trusts_its_caller(outside):
    plan = make_plan("tiny", pipeline=str(outside / "custom.yaml"))
    assert list(plan.stages) == ["run"]
