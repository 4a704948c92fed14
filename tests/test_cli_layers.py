"""The library functions under the CLI's commands, called directly: what `info`, `status`, `report`, `cache stats`
and `eval reasoning` compute, without typer or a subprocess (one subprocess checks `info` prints the same)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from gemstill.errors import GemstillError

REPO = Path(__file__).resolve().parents[1]


def test_model_info_is_what_info_json_prints() -> None:
    from gemstill.model_info import model_info

    described = model_info("gemma3-27b")
    assert set(described) == {"model", "config", "params", "memory"} and described["model"] == "gemma3-27b"
    assert described["params"]["total"] > 20e9 and "kv_cache_bytes_at_8192" in described["memory"]
    shorter = model_info("gemma3-27b", context=100, dtype="bfloat16")
    assert "kv_cache_bytes_at_100" in shorter["memory"] and shorter["config"]["dtype"] == "bfloat16"
    printed = subprocess.run(
        [sys.executable, "-m", "gemstill", "info", "--model", "gemma3-27b", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == json.loads(json.dumps(described))


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    from gemstill.pipeline.plan import make_plan

    return make_plan("tiny", store=str(tmp_path_factory.mktemp("cli-layers") / "store"))


def test_stage_rows_of_an_empty_store_are_all_missing(plan) -> None:
    from gemstill.pipeline.status import stage_rows

    rows = stage_rows(plan)
    assert [row["stage"] for row in rows] == list(plan.stages)
    for row in rows:
        assert set(row) == {"stage", "state", "key", "path", "metrics", "memory_bytes"}
        assert row["state"] == "missing" and row["metrics"] == {}
        assert row["key"] == plan.stages[row["stage"]].key
        assert row["path"] == f"{plan.store.root.rstrip('/')}/{row['stage']}/{row['key']}"
    assert any(row["memory_bytes"].get("total") for row in rows)  # the training stages estimate their memory


def test_report_and_cache_of_an_empty_store_refuse_with_the_cli_messages(plan) -> None:
    from gemstill.pipeline.report import load_report, report_dir, report_rows
    from gemstill.pipeline.status import teacher_cache_dir

    assert report_dir(plan) is None
    needle = "profile tiny has not been evaluated with these settings; run: gemstill run tiny"
    with pytest.raises(GemstillError, match=re.escape(needle)):
        report_rows(plan)
    with pytest.raises(GemstillError, match=re.escape("profile profiles/tiny.yaml has not been evaluated")):
        load_report(plan, "profiles/tiny.yaml")  # the name as the user gave it
    with pytest.raises(GemstillError, match="the teacher cache of profile tiny has not been built"):
        teacher_cache_dir(plan)


def test_evaluate_file_groups_by_kind_and_counts(tmp_path) -> None:
    from gemstill.reasoning.models import ScriptedModel
    from gemstill.reasoning.suite import evaluate_file, method_config

    problems = tmp_path / "mixed.jsonl"
    lines = [
        {"question": "Ann has 2 apples and buys 5. How many?", "answer": "2 + 5 = 7\n#### 7"},
        {"numbers": [1, 2, 3, 4]},
        {"question": "Bob has 9 pens and loses 3. How many?", "answer": "9 - 3 = 6\n#### 6"},
    ]
    problems.write_text("".join(json.dumps(line) + "\n" for line in lines))
    answers = {"Ann": "Answer: 7", "Bob": "Answer: 5"}  # Bob's is wrong

    def script(prompt: str, index: int) -> str:
        return next((a for who, a in answers.items() if who in prompt), "Answer: 1 * 2 * 3 * 4 = 24")

    scored = evaluate_file(ScriptedModel("scripted", script), str(problems), "cot", method_config("cot"))
    assert list(scored.results) == ["gsm8k", "game24"]
    assert [(r.total, r.correct) for r in scored.results.values()] == [(2, 1), (1, 1)]
    assert (scored.correct, scored.total) == (2, 3) and scored.accuracy == pytest.approx(2 / 3)
    assert set(scored.to_json()) == {"accuracy", "correct", "total", "records"}
    assert [r["correct"] for r in scored.records] == [True, False, True]

    only_gsm8k = tmp_path / "gsm8k.jsonl"
    only_gsm8k.write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(GemstillError, match="no Game-of-24 problems for --method tot"):
        evaluate_file(ScriptedModel("scripted", script), str(only_gsm8k), "tot", method_config("tot", breadth=1))
    with pytest.raises(ValidationError) as caught:
        method_config("sc", samples=0)
    assert caught.value.errors()[0]["loc"][0] == "samples"  # the CLI names the option from it: --samples


def test_the_cli_imports_no_prefect_or_jax() -> None:
    code = "import sys, gemstill.cli; print([m for m in ('prefect', 'jax', 'gemstill.flows') if m in sys.modules])"
    shown = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and json.loads(shown.stdout.replace("'", '"')) == [], shown.stderr


def test_the_library_layers_import_nothing_above_them() -> None:
    from gemstill.pipeline.code_version import module_closure

    roots = ("gemstill.model_info", "gemstill.pipeline.status", "gemstill.pipeline.report", "gemstill.reasoning.suite")
    closure = module_closure(roots)
    assert set(roots) <= set(closure)
    above = [
        m for m in closure if m.split(".")[:2] in (["gemstill", "cli"], ["gemstill", "flows"], ["gemstill", "tasks"])
    ]
    assert above == []
