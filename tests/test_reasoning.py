"""Verifiers, chain of thought, self-consistency and tree-of-thought search against scripted models (functions
from prompt to text, whose right and wrong answers are known), problem files, and the CLI's bad input."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from gemstill.data.config import GeneratedCorpusConfig
from gemstill.data.game24_tot import (
    Item,
    State,
    all_steps,
    can_reach_24,
    exercises,
    parse_step,
    parse_value,
    propose_prompt,
)
from gemstill.data.generated import basic_problems, game24_problems, generate, verify
from gemstill.errors import GemstillError
from gemstill.reasoning.config import ReasoningConfig, ToTConfig
from gemstill.reasoning.cot import chain_of_thought, majority, self_consistency
from gemstill.reasoning.models import ScriptedModel
from gemstill.reasoning.problems import (
    check,
    from_generated,
    game24_question,
    load_problems,
)
from gemstill.reasoning.suite import score_model
from gemstill.reasoning.tot import tree_of_thought

REPO = Path(__file__).resolve().parents[1]
PROBLEMS = [from_generated(p) for p in generate(GeneratedCorpusConfig(arithmetic=20, game24=10, basic=20, seed=4))]
BY_QUESTION = {p.question: p for p in PROBLEMS}
PUZZLES = [p for p in PROBLEMS if p.kind == "game24"]


def perfect_answerer(prompt: str, index: int) -> str:
    return BY_QUESTION[prompt].solution


def wrong_answerer(prompt: str, index: int) -> str:
    problem = BY_QUESTION[prompt]
    if problem.kind == "game24":
        numbers = re.findall(r"\d+", problem.question)[:3]
        return f"Answer: {' * '.join(numbers)} = 24"  # leaves a number unused: never a solution
    return f"Answer: {int(problem.answer) + 1}"


def _state(prompt: str) -> State:
    values = [Fraction(t) for t in re.match(r"Numbers: ([^\n]*)", prompt).group(1).split()]
    return State(tuple(Item(v, str(v)) for v in values))


def perfect_searcher(prompt: str, index: int) -> str:
    """Proposes every valid step, and values a state by whether code can still reach 24 from it."""
    state = _state(prompt)
    if "Propose" in prompt:
        return "\n".join(child.steps[-1] for child in all_steps(state))
    return "sure" if can_reach_24(state.values) else "impossible"


def test_generated_verifier_accepts_references_and_rejects_near_misses() -> None:
    for problem in PROBLEMS:
        answer, correct = check(problem, problem.solution)
        assert correct and answer.removesuffix(" = 24") == problem.answer
        assert not check(problem, problem.solution.replace("Answer:", "Result:"))[1]  # no answer line
    basic = basic_problems(50, seed=2)
    assert all(verify(p, p["solution"]) for p in basic)
    for p in basic:  # every step line is right: a op b = c checked by eval-free arithmetic
        for line in p["solution"].splitlines()[:-1]:
            a, op, b, c = re.search(r"(\d+) ([-+]) (\d+) = (\d+)", line).groups()
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c)


def test_perfect_answerer_scores_all_and_wrong_answerer_none() -> None:
    perfect = chain_of_thought(ScriptedModel("perfect", perfect_answerer), PROBLEMS)
    wrong = chain_of_thought(ScriptedModel("wrong", wrong_answerer), PROBLEMS)
    assert (perfect.accuracy, perfect.correct, perfect.total) == (1.0, len(PROBLEMS), len(PROBLEMS))
    assert (wrong.accuracy, wrong.correct) == (0.0, 0)
    record = perfect.to_json()["records"][0]
    assert set(record) >= {"id", "prompt", "output", "answer", "correct", "tokens", "seconds"}


def test_self_consistency_takes_the_majority() -> None:
    problem = next(p for p in PROBLEMS if p.kind == "basic")
    right, wrong = int(problem.answer), int(problem.answer) + 3
    for pattern, expected in (
        ([wrong, right, right, wrong, right], True),
        ([right, wrong, wrong, right, wrong], False),
    ):
        model = ScriptedModel("votes", lambda prompt, i, pattern=pattern: f"Answer: {pattern[i % 5]}")
        result = self_consistency(model, [problem], samples=5, temperature=0.7)
        assert result.records[0].correct is expected
        assert result.records[0].detail["votes"] == {str(right): pattern.count(right), str(wrong): pattern.count(wrong)}
        assert model.calls == 1  # all k samples of all problems in one batched call
    assert majority(["7", None, "3", "3", "7"]) == "7"  # a tie goes to the answer reached first
    assert majority([None, None]) is None


def test_tot_with_perfect_proposer_and_valuer_solves_every_puzzle_at_breadth_one() -> None:
    model = ScriptedModel("perfect", perfect_searcher)
    settings = ToTConfig(propose_tokens=400)  # room for every step of a four-number state (about 30 lines)
    result = tree_of_thought(model, PUZZLES, breadth=1, settings=settings)
    assert result.accuracy == 1.0, [r.output for r in result.records if not r.correct]
    assert model.calls == 2 * 3  # per level one batched propose call and one batched value call, all puzzles
    for record in result.records:
        assert record.output.splitlines()[-1] == f"Answer: {record.answer}"
        assert record.detail["invalid_steps"] == 0
    scored = tree_of_thought(
        ScriptedModel(
            "loglik",
            perfect_searcher,
            scorer=lambda p, word: 0.0 if (word == "sure") == can_reach_24(_state(p).values) else -9.0,
        ),
        PUZZLES,
        breadth=1,
        settings=ToTConfig(value="loglik", propose_tokens=400),
    )
    assert scored.accuracy == 1.0


def test_invalid_steps_never_count_as_solved() -> None:
    def liar(prompt: str, index: int) -> str:
        state = _state(prompt)
        if "Propose" not in prompt:
            return "sure"
        a, b = state.values[-1], state.values[-2]
        left = " ".join(str(v) for v in state.values[:-2])
        return "\n".join(
            [
                f"{a} + {b} = 24 (left: {left} 24)".replace("(left:  ", "(left: "),  # wrong arithmetic
                f"99 + 1 = 100 (left: {left} 100)",  # numbers the state does not have
                f"{a} * {b} = {a * b} (left: 1 2 3 4 5)",  # a wrong "left" list
                "the answer is 24",
            ]
        )

    result = tree_of_thought(ScriptedModel("liar", liar), PUZZLES, breadth=5)
    assert result.correct == 0
    assert all(r.detail["invalid_steps"] == r.detail["proposed_steps"] == 4 for r in result.records)
    start = State.start([4, 4, 4, 5])
    assert parse_step("4 / 4 = 1 (left: 1 4 5)", start) is not None
    assert parse_step("4 / 4 = 2 (left: 2 4 5)", start) is None
    assert parse_step("4 / 0 = 0 (left: 0 4 5)", start) is None
    assert parse_step("5 - 4 = 1 (left: 1 4 5)", start) is None  # "left" must be exactly what remains
    assert parse_step("5 - 4 = 1 (left: 1 4 4)", start).values == (1, 4, 4)


def test_tot_refuses_other_kinds_and_bad_breadth() -> None:
    with pytest.raises(GemstillError, match="use cot or sc"):
        tree_of_thought(ScriptedModel("x", perfect_answerer), PROBLEMS, breadth=1)
    with pytest.raises(GemstillError, match="at least 1"):
        tree_of_thought(ScriptedModel("x", perfect_answerer), PUZZLES, breadth=0)


def test_exercises_teach_only_right_steps_and_values() -> None:
    for problem in game24_problems(30, seed=9):
        for chat in exercises(problem, random.Random(problem["id"])):
            question, answer = chat[0]["content"], chat[1]["content"]
            state = _state(question)
            if "Propose" in question:
                assert all(parse_step(line, state) is not None for line in answer.splitlines())
            else:
                assert answer == ("sure" if can_reach_24(state.values) else "impossible")
    assert parse_value("Likely, I think") == 1.0 and parse_value("no idea") == 0.001
    assert propose_prompt([Fraction(3, 2), Fraction(4)]).startswith("Numbers: 3/2 4\n")


def test_suite_rows_cover_methods_kinds_and_breadths() -> None:
    config = ReasoningConfig(methods=["cot", "tot"], tot=ToTConfig(breadths=[1, 5], propose_tokens=400))

    def searcher_only(prompt: str, index: int) -> str:  # solves by search, never in one chain
        return perfect_searcher(prompt, index) if prompt.startswith("Numbers:") else "Answer: 24"

    model = ScriptedModel("searcher", searcher_only)
    rows = [row for row, _ in score_model(model, PUZZLES, config, log=lambda s: None)]
    assert [(r["method"], r["kind"]) for r in rows] == [("cot", "game24"), ("tot-b1", "game24"), ("tot-b5", "game24")]
    assert rows[1]["accuracy"] == rows[2]["accuracy"] == 1.0 and rows[0]["accuracy"] == 0.0


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_problem_files_gsm8k_and_game24(tmp_path) -> None:
    path = _write(
        tmp_path / "mixed.jsonl",
        [
            json.dumps(
                {
                    "question": "Tom has 1,200 cards and buys 34 more. How many?",
                    "answer": "1200 + 34 = 1234\n#### 1,234",
                }
            ),
            "",
            json.dumps({"numbers": [4, 4, 4, 5]}),
            json.dumps({"numbers": [1, 2, 3, 4], "id": "easy"}),
        ],
    )
    problems = load_problems(path)
    assert [(p.kind, p.id) for p in problems] == [("gsm8k", "line-1"), ("game24", "game24-4-4-4-5"), ("game24", "easy")]
    gsm = problems[0]
    assert gsm.answer == "1234" and gsm.solution.endswith("Answer: 1,234")
    assert check(gsm, "so 1234\nAnswer: 1,234.") == ("1,234.", True)
    assert check(gsm, "#### 1234") == ("1234", True)
    assert check(gsm, "Answer: 1235")[1] is False
    assert problems[1].question == game24_question([5, 4, 4, 4])
    assert check(problems[1], "Answer: (5 + 4 / 4) * 4 = 24")[1]
    assert not check(problems[1], "Answer: 4 * 5 + 4 = 24")[1]  # a number left unused
    assert [p.id for p in load_problems(path, limit=1)] == ["line-1", "game24-4-4-4-5"]


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        (['{"numbers": [4, 4, 4, 5]}', '{"question": "x", "answer": "7"', "{}"], "line 2: not valid JSON"),
        (['{"question": "x", "answer": "no marker"}'], "line 1: the GSM8K answer must end in a line '#### N'"),
        (['{"numbers": [4, 4, 5]}'], "line 1: 'numbers' must be a list of four positive integers"),
        (['{"text": "hello"}'], "line 1: not a problem"),
        ([], "has no problems"),
    ],
)
def test_malformed_problem_files_name_the_line(tmp_path, lines, needle) -> None:
    with pytest.raises(GemstillError, match=re.escape(needle)):
        load_problems(_write(tmp_path / "bad.jsonl", lines))


def gemstill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemstill", *args], capture_output=True, text=True, cwd=REPO)


def _one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr


@pytest.fixture(scope="module")
def hf_without_template(tmp_path_factory) -> Path:
    """A random tiny model exported to HF, whose tokenizer_config.json then loses its chat template."""
    from gemstill.data.config import TokenizerTrainingConfig
    from gemstill.data.prepare import train_sentencepiece
    from gemstill.export import export_model
    from gemstill.model import build_model
    from gemstill.params import to_flat

    lines = iter([p.question for p in PROBLEMS] * 3)
    tokenizer = train_sentencepiece(lines, TokenizerTrainingConfig(vocab_size=400))
    config = TINY.replace(head_dim=32, query_pre_attn_scalar=32.0)
    flat = {k: np.asarray(v) for k, v in to_flat(build_model(config, seed=2)).items()}
    out = export_model(config, flat, tokenizer, "hf", tmp_path_factory.mktemp("hf") / "model")
    settings = json.loads((out / "tokenizer_config.json").read_text())
    del settings["chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(settings))
    return out


def test_cli_bad_input_is_one_line(tmp_path, hf_without_template) -> None:
    spec = f"hf:{hf_without_template}"
    good = _write(tmp_path / "good.jsonl", [json.dumps({"numbers": [4, 4, 4, 5]})])
    bad = _write(tmp_path / "bad.jsonl", ['{"numbers": [4, 4, 4, 5]}', "not json"])
    empty = _write(tmp_path / "empty.jsonl", [])
    base = ("eval", "reasoning", "--model", spec)
    _one_line_error(gemstill(*base, "--problems", str(good), "--method", "beam"), "unknown method 'beam'")
    _one_line_error(gemstill(*base, "--problems", str(bad)), "bad.jsonl line 2: not valid JSON")
    _one_line_error(gemstill(*base, "--problems", str(empty)), "has no problems")
    _one_line_error(gemstill(*base, "--problems", str(good), "--prompt", "chat"), "has no chat template")
    result = gemstill(
        *base, "--problems", str(good), "--prompt", "few-shot", "--shots", "0", "--max-new-tokens", "4", "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["total"] == 1 and set(report["records"][0]) >= {"id", "prompt", "output", "answer", "correct"}


def test_prepared_corpus_teaches_the_thought_language_when_asked(tmp_path) -> None:
    from gemstill.data.config import DataConfig
    from gemstill.data.prepare import collect_examples

    generated = GeneratedCorpusConfig(arithmetic=0, basic=30, game24=10, heldout_fraction=0.2)
    plain, heldout = collect_examples(DataConfig(generated=generated), tmp_path)
    taught, same_heldout = collect_examples(
        DataConfig(generated=generated.model_copy(update={"tot_exercises": True})), tmp_path
    )
    assert same_heldout == heldout and taught[: len(plain)] == plain
    extra = taught[len(plain) :]
    assert extra and all(chat[0]["content"].startswith("Numbers: ") for chat in extra)
    held_numbers = {tuple(p["id"].split("-")[1:]) for p in heldout if p["kind"] == "game24"}
    for chat in extra:  # never a held-out puzzle's opening state
        first = tuple(chat[0]["content"].splitlines()[0].removeprefix("Numbers: ").split())
        assert first not in held_numbers


def test_reasoning_models_selects_by_name_and_refuses_unknown_names(tmp_path):
    from gemstill.pipeline.context import StageContext
    from gemstill.pipeline.profile import load_profile
    from gemstill.pipeline.reasoning_stages import reasoning_models

    def context(models):
        profile, _ = load_profile("tiny", {"reasoning.models": models})
        inputs = {"pretrain_teacher": tmp_path / "teacher", "train_student": tmp_path / "student"}
        return StageContext("evaluate_reasoning", profile, inputs, tmp_path)

    assert [name for name, _ in reasoning_models(context(["student"]))] == ["student"]
    assert [name for name, _ in reasoning_models(context(None))] == ["teacher", "student"]
    with pytest.raises(GemstillError, match=r"reasoning.models names \['nobody'\], not among"):
        reasoning_models(context(["nobody", "teacher"]))


def test_the_shipped_everyday_problems_are_the_generators_and_check_out():
    """problems/everyday.jsonl is everyday_problems(12, 0, kind) for each kind, every solution verifies, and a
    few-shot prompt shows worked examples of the problem's own kind, never an evaluated problem."""
    from gemstill.data.generated import EVERYDAY_KINDS, everyday_problems, verify
    from gemstill.reasoning.problems import load_problems
    from gemstill.reasoning.suite import shots_for

    shipped = [json.loads(line) for line in (REPO / "problems" / "everyday.jsonl").read_text().splitlines()]
    assert shipped == [p for kind in EVERYDAY_KINDS for p in everyday_problems(12, 0, kind)]
    assert all(verify(p, p["solution"]) and not verify(p, "Answer: -1") for p in shipped)
    problems = load_problems(REPO / "problems" / "everyday.jsonl")
    assert [p.kind for p in problems] == [k for k in EVERYDAY_KINDS for _ in range(12)]
    for kind in EVERYDAY_KINDS:
        ids = {p.id for p in problems if p.kind == kind}
        shots = shots_for(kind, 3, ids)
        assert len(shots) == 3 and {s.kind for s in shots} == {kind} and not ids & {s.id for s in shots}


def test_accuracy_intervals_and_the_fraction_of_the_teacher():
    from gemstill.reasoning.suite import add_teacher_fraction

    rows = [
        {"model": "teacher", "method": "cot", "kind": "sum", "accuracy": 0.75},
        {"model": "student", "method": "cot", "kind": "sum", "accuracy": 0.5},
    ]
    correct = {
        ("teacher", "cot", "sum"): [True, True, True, False] * 5,
        ("student", "cot", "sum"): [True, False, True, False] * 5,
    }
    add_teacher_fraction(rows, correct)
    teacher, student = rows
    assert teacher["fraction_of_teacher"] == 1.0 and "fraction_of_teacher_low" not in teacher
    assert student["fraction_of_teacher"] == pytest.approx(2 / 3)
    for row in rows:
        assert 0 <= row["accuracy_low"] < row["accuracy"] < row["accuracy_high"] <= 1
    assert student["fraction_of_teacher_low"] < 2 / 3 < student["fraction_of_teacher_high"]
