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
    plan = make_plan("tiny", store=str(outside / "runs" / "store"), restricted=True)  # under the default ./runs
    assert "train_student" in plan.stages
    make_plan("tiny", pipeline="from-scratch-cot", store=str(outside / "runs" / "store"), restricted=True)


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


@pytest.fixture
def watched(outside):
    """A file outside every configured root, and the list of audit events (open, scandir, ...) that touch it: an
    audit hook sees every file Python opens, lists or globs in this process."""
    secret = outside / "secret" / "key.txt"
    secret.parent.mkdir()
    secret.write_text("not for deployment runs")
    touched: list[str] = []
    active = [True]

    def hook(event: str, args: tuple) -> None:
        watched_event = event in ("open", "os.scandir", "os.listdir", "glob.glob", "os.stat")
        if active[0] and watched_event and args and "secret" in str(args[0]):
            touched.append(f"{event} {args[0]}")

    import sys

    sys.addaudithook(hook)  # hooks cannot be removed: this one goes quiet after the test
    yield secret, touched
    active[0] = False


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"data.source": "files", "data.files": {"paths": ["{secret}"], "format": "text"}}, "data.files.paths"),
        ({"data.source": "files", "data.files": {"paths": ["{dir}/*.txt"], "format": "text"}}, "data.files.paths"),
        ({"reasoning.problems": ["{secret}"]}, "reasoning.problems"),
        ({"teacher": {"model": "gguf:{secret}"}}, "teacher.model"),
        ({"evaluate.out_of_domain": {"source": "files", "files": {"paths": ["{secret}"]}}}, "evaluate"),
        ({"store": "{dir}"}, "store"),
    ],
)
def test_a_deployment_run_cannot_point_a_path_outside_the_configured_roots(watched, overrides, setting):
    """Overrides (and the store parameter) of a deployment run may name paths only under $GEMSTILL_DATA and
    $GEMSTILL_STORES: anything else is refused in one line before any file is opened, listed or hashed."""
    secret, touched = watched

    def filled(value):
        if isinstance(value, dict):
            return {k: filled(v) for k, v in value.items()}
        if isinstance(value, list):
            return [filled(v) for v in value]
        return value.format(secret=secret, dir=secret.parent) if isinstance(value, str) else value

    with pytest.raises(GemstillError, match=rf"^{setting}.*is outside the configured roots .*GEMSTILL_") as error:
        make_plan("tiny", overrides=filled(overrides), restricted=True)
    assert "\n" not in str(error.value)
    assert touched == []
    make_plan("tiny", overrides={"store": str(secret.parent / "store")}, restricted=False)  # by hand: trusted


def test_paths_under_the_configured_roots_are_allowed(watched, monkeypatch):
    secret, touched = watched
    monkeypatch.setenv("GEMSTILL_DATA", str(secret.parent))
    monkeypatch.setenv("GEMSTILL_STORES", str(secret.parent.parent / "stores"))
    data = {"data.source": "files", "data.files": {"paths": [str(secret)], "format": "text"}}
    plan = make_plan("tiny", store=str(secret.parent.parent / "stores" / "a"), overrides=data, restricted=True)
    assert plan.stages["prepare_data"].key and touched  # planning hashed the file, as it may
    with pytest.raises(GemstillError, match=r"store: .* is outside the configured roots"):
        make_plan("tiny", store=str(secret.parent.parent / "stores-not"), restricted=True)
    with pytest.raises(GemstillError, match=r"store: .* is outside the configured roots"):
        make_plan("tiny", store=str(secret.parent.parent / "stores" / ".." / "escape"), restricted=True)
