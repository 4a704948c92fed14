"""The nightly evaluation: history in DuckDB, regressions against the previous night, trend plot, the choice of
models from the store, and (with a real Prefect server) the scheduled deployment run twice, then failing on a
deliberately worse student."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gemstill.errors import GemstillError
from gemstill.nightly.history import (
    FIELDS,
    RegressionError,
    append_night,
    check_thresholds,
    compare,
    read_history,
    save_trend,
)

NIGHT_1 = dt.datetime(2030, 1, 1, 2, 0, tzinfo=dt.UTC)
NIGHT_2 = NIGHT_1 + dt.timedelta(days=1)
NIGHT_3 = NIGHT_2 + dt.timedelta(days=1)
THRESHOLDS = {"val_nll": 0.05, "kl_to_teacher": 0.05, "accuracy": 0.05}


def rows(**values: float) -> list[dict]:
    """One row per metric of the student (metric names use '__' for '/')."""
    return [
        {
            "model": "student",
            "model_key": "k1",
            "suite": "reasoning" if name.startswith(("accuracy", "tokens")) else "heldout",
            "metric": name.replace("__", "/"),
            "value": value,
        }
        for name, value in values.items()
    ]


def test_history_appends_nights_and_reads_six_fields(tmp_path):
    path = tmp_path / "history.duckdb"
    assert read_history(path) == []
    append_night(path, NIGHT_1, rows(val_nll=1.5, accuracy__cot__basic=0.5))
    append_night(path, NIGHT_2, rows(val_nll=1.4, accuracy__cot__basic=0.6))
    history = read_history(path)
    assert [tuple(r) for r in history] == [FIELDS] * 4
    assert history[0] == {
        "run_time": "2030-01-01T02:00:00+00:00",
        "model": "student",
        "model_key": "k1",
        "suite": "heldout",
        "metric": "val_nll",
        "value": 1.5,
    }
    assert sorted({r["run_time"] for r in history}) == [NIGHT_1.isoformat(), NIGHT_2.isoformat()]
    append_night(path, NIGHT_2, rows(val_nll=1.3))  # the same night again (a retried task) replaces it
    assert [(r["run_time"], r["metric"], r["value"]) for r in read_history(path)][2:] == [
        (NIGHT_2.isoformat(), "val_nll", 1.3)
    ]


def test_a_failed_night_leaves_nothing_of_itself(tmp_path):
    path = tmp_path / "history.duckdb"
    append_night(path, NIGHT_1, rows(val_nll=1.5))
    broken = [*rows(val_nll=1.4), {**rows(val_nll=1.4)[0], "model": object()}]  # the second insert fails
    with pytest.raises(Exception, match="transform python value"):
        append_night(path, NIGHT_2, broken)
    assert [r["run_time"] for r in read_history(path)] == [NIGHT_1.isoformat()]


def night_changes(tmp_path, before: dict, tonight: dict, thresholds=THRESHOLDS):
    path = tmp_path / "history.duckdb"
    append_night(path, NIGHT_1, rows(val_nll=9.0, accuracy__cot__basic=0.0))  # an older night, never compared
    append_night(path, NIGHT_2, rows(**before))
    append_night(path, NIGHT_3, rows(**tonight))
    previous, changes = compare(read_history(path), NIGHT_3, thresholds)
    assert previous == NIGHT_2.isoformat()
    return {c.metric: c for c in changes}


def test_regressions_in_both_directions_past_the_threshold(tmp_path):
    changes = night_changes(
        tmp_path,
        before=dict(val_nll=1.0, kl_to_teacher=0.5, accuracy__cot__basic=0.6, accuracy__sc__basic=0.6, val_ppl=2.7),
        tonight=dict(val_nll=1.2, kl_to_teacher=0.52, accuracy__cot__basic=0.5, accuracy__sc__basic=0.9, val_ppl=3.3),
    )
    assert changes["val_nll"].regressed  # lower is better: +0.2 > 0.05
    assert not changes["kl_to_teacher"].regressed  # +0.02 is within 0.05
    assert changes["accuracy/cot/basic"].regressed  # higher is better: -0.1
    assert not changes["accuracy/sc/basic"].regressed  # it improved
    assert not changes["val_ppl"].regressed  # no threshold: recorded, never fails
    assert changes["val_ppl"].threshold is None and changes["accuracy/sc/basic"].threshold == 0.05


def test_improvements_new_metrics_and_untracked_families_never_fail(tmp_path):
    changes = night_changes(
        tmp_path,
        before=dict(val_nll=1.0, tokens_per_problem__cot__basic=40.0),
        tonight=dict(val_nll=0.5, tokens_per_problem__cot__basic=400.0, accuracy__tot_b5__game24=0.0),
    )
    assert not any(c.regressed for c in changes.values())
    assert changes["accuracy/tot_b5/game24"].previous is None


def test_a_metric_gone_nan_is_a_regression(tmp_path):
    changes = night_changes(tmp_path, before=dict(val_nll=1.0), tonight=dict(val_nll=math.nan))
    assert changes["val_nll"].regressed


def test_each_metric_is_compared_with_its_latest_earlier_value(tmp_path):
    """A night that ran only one suite hides nothing: the next night's other metrics still meet their last values,
    and a regression by a newly committed model names both model keys."""
    path = tmp_path / "history.duckdb"
    append_night(path, NIGHT_1, rows(val_nll=1.0, accuracy__cot__basic=0.6))
    append_night(path, NIGHT_2, rows(accuracy__cot__basic=0.6))
    append_night(path, NIGHT_3, [{**r, "model_key": "k2"} for r in rows(val_nll=2.0, accuracy__cot__basic=0.6)])
    previous, changes = compare(read_history(path), NIGHT_3, THRESHOLDS)
    by_metric = {c.metric: c for c in changes}
    assert previous == NIGHT_2.isoformat()
    assert by_metric["val_nll"].previous_time == NIGHT_1.isoformat() and by_metric["val_nll"].regressed
    assert by_metric["val_nll"].describe() == "student (k1 → k2) heldout val_nll 1 → 2 (+1, threshold 0.05)"
    assert by_metric["accuracy/cot/basic"].previous_time == NIGHT_2.isoformat()


def test_unknown_threshold_family_is_refused():
    check_thresholds(THRESHOLDS)
    with pytest.raises(GemstillError, match="unknown metric family acuracy"):
        check_thresholds({"acuracy": 0.1})


def test_record_night_appends_then_fails_naming_the_regression(tmp_path):
    from gemstill.nightly.record import record_night
    from gemstill.pipeline.profile import load_profile

    profile, _ = load_profile("tiny")
    record_night(tmp_path, profile, NIGHT_1, rows(val_nll=1.0, accuracy__cot__basic=0.5))
    night = record_night(tmp_path, profile, NIGHT_2, rows(val_nll=1.25, accuracy__cot__basic=0.5))
    assert [c.metric for c in night.regressed] == ["val_nll"]
    with pytest.raises(RegressionError) as raised:
        night.raise_for_regressions()
    message = str(raised.value)
    assert "\n" not in message
    assert message == (
        f"1 metric(s) regressed against the night of {NIGHT_1.isoformat()}: "
        "student heldout val_nll 1 → 1.25 (+0.25, threshold 0.05)"
    )
    assert {r["run_time"] for r in read_history(tmp_path / "history.duckdb")} == {
        NIGHT_1.isoformat(),
        NIGHT_2.isoformat(),
    }
    assert "**REGRESSED**" in night.markdown and str(night.trend) in night.markdown
    assert night.report.read_text() == night.markdown
    assert night.trend.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trend_plot_has_a_panel_per_suite_and_family(tmp_path):
    path = tmp_path / "history.duckdb"
    for i, night in enumerate((NIGHT_1, NIGHT_2, NIGHT_3)):
        night_rows = rows(val_nll=1.0 - 0.1 * i, kl_to_teacher=0.5, accuracy__cot__basic=0.5, accuracy__sc__basic=0.7)
        append_night(path, night, [*night_rows, *({**r, "model": "baseline"} for r in night_rows)])
    png = save_trend(tmp_path / "trend.png", read_history(path))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = save_trend(tmp_path / "empty.png", [])
    assert empty.stat().st_size > 0


def commit(store: Path, stage: str, key: str, finished_at: float, inputs=None, settings=None) -> None:
    """A committed stage run as the store records it (only the manifest: what the choice of models reads)."""
    directory = store / stage / key
    directory.mkdir(parents=True)
    manifest = {"stage": stage, "key": key, "finished_at": finished_at, "inputs": inputs or {}}
    (directory / "manifest.json").write_text(json.dumps({**manifest, "settings": settings or {}}))


def test_the_latest_student_and_what_belongs_to_it_are_chosen(tmp_path):
    from gemstill.nightly.select import select_night
    from gemstill.pipeline.plan import make_plan

    store = tmp_path / "store"
    plan = make_plan("tiny", store=str(store))
    with pytest.raises(GemstillError, match=f"no committed train_student in store {store}; run `gemstill run tiny`"):
        select_night(plan)
    data = {"prepare_data": "data1", "pretrain_teacher": "teach1"}
    commit(store, "prepare_data", "data1", 1)
    commit(store, "prepare_data", "data2", 50)  # newer data, which the latest student was not trained on
    commit(store, "pretrain_teacher", "teach1", 2)
    commit(store, "train_student", "old", 10, data)
    commit(store, "train_student", "new", 20, data)
    commit(store, "train_baseline", "base1", 15, data)
    commit(store, "train_baseline", "base2", 60, {**data, "prepare_data": "data2"})  # other data: not comparable
    commit(store, "quantize", "ptq-old", 30, {"train_student": "old"}, {"quantize": {"formats": ["q8_0"]}})
    commit(store, "quantize", "ptq-new", 25, {"train_student": "new"}, {"quantize": {"formats": ["q8_0", "q4_0"]}})
    commit(store, "qat", "qat-new", 26, {"train_student": "new"}, {"qat": {"formats": ["int8"]}})
    (store / "train_student" / "partial").mkdir()  # a run without a manifest is not committed
    night = select_night(plan)
    assert night.data_key == "data1" and night.data_dir == store / "prepare_data" / "data1"
    assert [(m.name, m.key, m.spec) for m in night.models] == [
        ("teacher", "teach1", f"orbax:{store}/pretrain_teacher/teach1/model"),
        ("student", "new", f"orbax:{store}/train_student/new/model"),
        ("baseline", "base1", f"orbax:{store}/train_baseline/base1/model"),
        ("student-q8_0-ptq", "ptq-new/q8_0", f"gguf:{store}/quantize/ptq-new/q8_0/model.gguf"),
        ("student-q4_0-ptq", "ptq-new/q4_0", f"gguf:{store}/quantize/ptq-new/q4_0/model.gguf"),
        ("student-int8-qat", "qat-new/int8", f"orbax:{store}/qat/qat-new/int8/quantized"),
    ]


def test_remote_stores_and_bad_thresholds_are_refused_before_any_work(tmp_path):
    from gemstill.nightly.select import select_night
    from gemstill.pipeline.plan import make_plan

    with pytest.raises(GemstillError, match="the nightly history is a local DuckDB file"):
        select_night(make_plan("tiny", store="memory://nightly-store"))
    with pytest.raises(GemstillError, match="unknown metric family"):
        select_night(make_plan("tiny", store=str(tmp_path), overrides={"nightly.max_regression": {"nll": 0.1}}))


def test_history_command_prints_the_rows(tmp_path):
    from typer.testing import CliRunner

    from gemstill.cli import app

    store = tmp_path / "store"
    runner = CliRunner()
    empty = runner.invoke(app, ["eval", "history", "tiny", "--store", str(store), "--json"])
    assert empty.exit_code == 0 and json.loads(empty.stdout) == []
    append_night(store / "nightly" / "history.duckdb", NIGHT_1, rows(val_nll=1.5, accuracy__cot__basic=0.5))
    result = runner.invoke(app, ["eval", "history", "tiny", "--store", str(store), "--json"])
    assert result.exit_code == 0, result.output
    history = json.loads(result.stdout)
    assert [set(r) for r in history] == [set(FIELDS)] * 2
    assert history[1]["metric"] == "accuracy/cot/basic" and history[1]["run_time"] == NIGHT_1.isoformat()
    table = runner.invoke(app, ["eval", "history", "tiny", "--store", str(store)])
    assert table.exit_code == 0 and "1 night(s) in" in table.stdout


# --- a real Prefect server: the scheduled deployment, two nights, then a worse student fails the third

PRETRAIN = ("--set", "teacher.scratch.training.steps=40")  # a night needs a student to score, not a good teacher
NIGHTLY = {"evaluate.max_sequences": 32, "reasoning.limit": 2, "reasoning.methods": ["cot"]}


def gemstill_cli(*args: str) -> subprocess.CompletedProcess:
    from prefect_cli import REPO

    result = subprocess.run(
        [sys.executable, "-m", "gemstill", *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"gemstill {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    return result


def student_pipeline(tmp_path: Path) -> Path:
    """The from-scratch pipeline up to the student and its PTQ variants: what a night scores, and no more."""
    from prefect_cli import REPO

    spec = yaml.safe_load((REPO / "pipelines" / "from-scratch.yaml").read_text())
    keep = ("prepare_data", "pretrain_teacher", "teacher_cache", "layer_map", "train_student", "quantize")
    spec["stages"] = {name: stage for name, stage in spec["stages"].items() if name in keep}
    path = tmp_path / "student-pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _prefect_yaml_with_store(tmp_path: Path, store: Path) -> Path:
    """The shipped prefect.yaml with `definitions.store` (its one store setting) pointed at this test's store."""
    from prefect_cli import REPO

    text = (REPO / "prefect.yaml").read_text()
    assert text.count("store: &store runs/store") == 1 and text.count("prefect_file: prefect.yaml") == 1
    path = tmp_path / "prefect.yaml"
    path.write_text(
        text.replace("store: &store runs/store", f"store: &store {store}").replace(
            "prefect_file: prefect.yaml", f"prefect_file: {path}"
        )
    )
    return path


def test_nightly_deployment_is_scheduled_runs_twice_and_fails_on_a_worse_student(prefect_server, tmp_path):
    from prefect_cli import deployment_run, prefect, process_worker

    env, store, pipeline = prefect_server, tmp_path / "store", student_pipeline(tmp_path)
    env = {**env, "GEMSTILL_STORES": str(tmp_path)}  # the worker's store root: the deployments' store lies under it
    gemstill_cli("run", "tiny", "--store", str(store), "--pipeline", str(pipeline), *PRETRAIN)
    prefect(env, "work-pool", "create", "gemstill-process", "--type", "process")
    prefect_file = str(_prefect_yaml_with_store(tmp_path, store))
    prefect(env, "--no-prompt", "deploy", "--prefect-file", prefect_file, "--all", timeout=300)  # every deployment
    for name in ("tiny", "gemma3-270m", "gemma3-4b-tpu-v5e"):
        deployment = json.loads(
            prefect(env, "deployment", "inspect", f"nightly-eval/nightly-{name}", "-o", "json").stdout
        )
        # the 02:00 UTC schedule, inactive until a user chooses the profile; the store the distill deployment has
        assert [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in deployment["schedules"]] == [
            ("0 2 * * *", "UTC", False)
        ]
        assert deployment["parameters"] == {"profile": name, "store": str(store)}
        distill = json.loads(prefect(env, "deployment", "inspect", f"distill/distill-{name}", "-o", "json").stdout)
        assert distill["parameters"]["store"] == str(store)
    tiny = json.loads(prefect(env, "deployment", "inspect", "nightly-eval/nightly-tiny", "-o", "json").stdout)
    prefect(env, "deployment", "schedule", "resume", "nightly-eval/nightly-tiny", tiny["schedules"][0]["id"])
    deadline = time.time() + 90
    while True:  # the server's scheduler fills in the upcoming nights within seconds
        listed = prefect(env, "flow-run", "ls", "--flow-name", "nightly-eval", "--state", "Scheduled", "-o", "json")
        upcoming = [r for r in json.loads(listed.stdout or "[]") if r["deployment_id"] == tiny["id"]]
        others = [r for r in json.loads(listed.stdout or "[]") if r["deployment_id"] != tiny["id"]]
        if upcoming or time.time() > deadline:
            break
        time.sleep(2)
    assert upcoming, "no scheduled runs of nightly-eval/nightly-tiny"
    assert not others, "a nightly deployment no one chose was scheduled"
    now = dt.datetime.now(dt.UTC)
    for run in upcoming:
        start = dt.datetime.fromisoformat(run["expected_start_time"]).astimezone(dt.UTC)
        assert (start.hour, start.minute) == (2, 0) and start > now, start
    prefect(env, "--no-prompt", "deployment", "schedule", "pause", "--all")  # no real 02:00 run during the test

    params = json.dumps({"overrides": NIGHTLY})  # the store: the deployment's own, from prefect.yaml
    with process_worker(env, tmp_path / "worker.log"):
        teacher_rows = None
        for _ in range(2):
            _, state = deployment_run(env, "nightly-eval/nightly-tiny", "--params", params, timeout=600)
            assert state == "Completed", state
            cached = list(store.glob("nightly_teacher_reasoning/*/manifest.json"))
            assert len(cached) == 1
            teacher_rows = teacher_rows or cached[0].stat().st_mtime_ns
            assert cached[0].stat().st_mtime_ns == teacher_rows  # the teacher's reasoning is scored once
        history = json.loads(gemstill_cli("eval", "history", "tiny", "--store", str(store), "--json").stdout)
        assert len({r["run_time"] for r in history}) == 2
        assert all(list(r) == list(FIELDS) for r in history)
        assert {(r["model"], r["suite"]) for r in history} == {
            (model, suite)
            for model in ("teacher", "student", "student-q8_0-ptq", "student-q4_0-ptq")
            for suite in ("heldout", "reasoning")
        }

        # a newer, worse student: one step (still at the learning-rate warmup's zero) instead of the profile's 40
        gemstill_cli(
            "run", "tiny", "--store", str(store), "--pipeline", str(pipeline), *PRETRAIN, "--set", "training.steps=1"
        )
        flow_run, state = deployment_run(env, "nightly-eval/nightly-tiny", "--params", params, timeout=600)
        assert state == "Failed", state
        logs = prefect(env, "flow-run", "logs", flow_run).stdout
        assert "RegressionError" in logs and "metric(s) regressed against the night of" in logs, logs[-3000:]
        assert re.search(r"student \(\w+ → \w+\) heldout val_nll [\d.]+ → [\d.]+ \(\+[\d.]+, threshold 0\.05\)", logs)
    history = json.loads(gemstill_cli("eval", "history", "tiny", "--store", str(store), "--json").stdout)
    assert len({r["run_time"] for r in history}) == 3  # the failing night is recorded too
    keys = {r["model_key"] for r in history if r["model"] == "student"}
    assert len(keys) == 2


def test_deploying_refuses_deployments_of_a_profile_on_different_stores():
    """The build step of prefect.yaml: the shipped file passes; a nightly on another store than its distill, a
    deployment without a store, or a nightly on a remote store are refused, each named."""
    from gemstill.flows.deploy_check import check_deployments, problems
    from prefect_cli import REPO

    shipped = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert check_deployments(str(REPO / "prefect.yaml")) == {} and problems(shipped) == []
    distill = {"name": "distill-tiny", "entrypoint": "flows/distill.py:distill"}
    nightly = {"name": "nightly-tiny", "entrypoint": "flows/nightly.py:nightly_eval"}
    apart = {
        "deployments": [
            {**distill, "parameters": {"profile": "tiny", "store": "/a"}},
            {**nightly, "parameters": {"profile": "tiny", "store": "/b"}},
            {**nightly, "name": "nightly-x", "parameters": {"profile": "x"}},
            {**nightly, "name": "nightly-y", "parameters": {"profile": "y", "store": "s3://bucket/store"}},
        ]
    }
    found = problems(apart)
    assert found == [
        "deployment nightly-x: no store parameter; give it the shared one (store: *store in prefect.yaml)",
        "deployment nightly-y: store s3://bucket/store is not a local directory; the nightly history needs one",
        "profile tiny: its deployments name different stores (distill-tiny -> /a, nightly-tiny -> /b); the nightly "
        "would not see what distill wrote: give them one store",
    ]
