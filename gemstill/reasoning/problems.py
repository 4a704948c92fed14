"""Problems whose answers code checks: the generated corpus' held-out problems, GSM8K-format and Game-of-24 files.

Every file is read offline through `datasets`, after a line-by-line check that names the first bad line, so a
malformed file fails with its line number rather than a schema error from deep inside pyarrow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from gemstill.data.generated import EVERYDAY_KINDS, Problem, final_answer, reaches_24, verify
from gemstill.errors import GemstillError
from gemstill.reasoning.config import ReasoningConfig

Kind = Literal["arithmetic", "basic", "game24", "gsm8k"]
GENERATED_KINDS = ("arithmetic", "basic", "game24", *EVERYDAY_KINDS)


@dataclasses.dataclass(frozen=True)
class ReasoningProblem:
    """One question, its reference final answer and (where known) a worked solution."""

    id: str
    kind: Kind
    question: str
    answer: str  # a number, or for Game of 24 one expression that makes 24
    solution: str = ""  # reference steps ending in "Answer: ...", for few-shot examples

    def as_generated(self) -> Problem:
        return Problem(id=self.id, kind=self.kind, question=self.question, solution=self.solution, answer=self.answer)


def game24_question(numbers: list[int]) -> str:
    """The generated corpus' wording of a puzzle, so a file's puzzles read exactly like the trained ones."""
    return f"Use {' '.join(map(str, sorted(numbers)))} to make 24 with +, -, * and /, using each number exactly once."


def extract_answer(text: str) -> str | None:
    """The final answer of a model's output: its last "Answer:" line, else its last "#### N" line (GSM8K)."""
    answer = final_answer(text)
    if answer is not None:
        return answer
    marks = re.findall(r"^\s*####\s*(.+?)\s*$", text, flags=re.MULTILINE)
    return marks[-1] if marks else None


def _number(text: str) -> Fraction | None:
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def check(problem: ReasoningProblem, output: str) -> tuple[str | None, bool]:
    """(the extracted final answer, whether code accepts it): numbers compare exactly, a Game-of-24 expression
    must use the puzzle's four numbers once each and evaluate to 24."""
    answer = extract_answer(output)
    if answer is None:
        return None, False
    if problem.kind == "gsm8k":
        got, want = _number(answer), _number(problem.answer)
        return answer, got is not None and got == want
    return answer, verify(problem.as_generated(), f"Answer: {answer}")


def normalized(problem: ReasoningProblem, answer: str | None) -> str | None:
    """The form answers are voted on in: a number's exact value, or an expression without spaces."""
    if answer is None:
        return None
    if problem.kind == "game24":
        return re.sub(r"\s+|=\s*24\s*\.?$", "", answer)
    value = _number(answer)
    return str(value) if value is not None else answer.strip()


def from_generated(problem: Problem) -> ReasoningProblem:
    return ReasoningProblem(problem["id"], problem["kind"], problem["question"], problem["answer"], problem["solution"])


def _parse_line(record: Any, where: str) -> ReasoningProblem:
    """One line of a problem file in any of the three formats (generated, GSM8K, Game of 24)."""
    if not isinstance(record, dict):
        raise GemstillError(f"{where}: a problem is a JSON object, not {type(record).__name__}; fix the line")
    if record.get("kind") in GENERATED_KINDS and {"id", "question", "answer"} <= record.keys():
        return ReasoningProblem(
            str(record["id"]), record["kind"], record["question"], str(record["answer"]), record.get("solution", "")
        )
    if "numbers" in record:
        numbers = record["numbers"]
        if not (isinstance(numbers, list) and len(numbers) == 4 and all(isinstance(n, int) and n > 0 for n in numbers)):
            raise GemstillError(f"{where}: 'numbers' must be a list of four positive integers, got {numbers!r}")
        if not reaches_24(tuple(sorted(Fraction(n) for n in numbers))):
            raise GemstillError(
                f"{where}: {numbers} cannot make 24 with + - * / (each number once); no model can solve it: drop or "
                "fix the line"
            )
        pid = str(record.get("id", "game24-" + "-".join(map(str, sorted(numbers)))))
        return ReasoningProblem(pid, "game24", game24_question(numbers), "")
    if "question" in record and "answer" in record:
        answer = str(record["answer"])
        marks = re.findall(r"####\s*(.+?)\s*$", answer.strip())
        if not marks or _number(marks[-1]) is None:
            raise GemstillError(f"{where}: the GSM8K answer must end in a line '#### N' with N a number; fix the line")
        steps = answer.strip().rsplit("####", 1)[0].strip()
        return ReasoningProblem(
            str(record.get("id", "line-" + where.rsplit(" ", 1)[-1])),
            "gsm8k",
            str(record["question"]),
            marks[-1].replace(",", ""),
            f"{steps}\nAnswer: {marks[-1]}" if steps else f"Answer: {marks[-1]}",
        )
    raise GemstillError(
        f"{where}: not a problem: give question + answer (GSM8K, answer ending '#### N'), numbers: [a, b, c, d] "
        "(Game of 24), or a generated problem (id, kind, question, answer)"
    )


def _check_lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GemstillError(f"problem file {path} not found; check the path") from None
    except UnicodeDecodeError:
        raise GemstillError(f"problem file {path} is not UTF-8 text; convert it to UTF-8 JSON lines") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise GemstillError(f"{path} line {number}: not valid JSON ({err.msg}); fix or remove the line") from None
        _parse_line(record, f"{path} line {number}")
        records.append(record)
    if not records:
        raise GemstillError(f"problem file {path} has no problems; give one JSON object per line")
    return records


def load_problems(path: str | os.PathLike[str], limit: int | None = None) -> list[ReasoningProblem]:
    """The problems of a jsonl file (checked line by line, then read through `datasets`, offline), in file order;
    `limit` keeps the first ones of each kind."""
    path = Path(path)
    _check_lines(path)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="gemstill-problems-") as cache:
        try:
            rows = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache)
        except Exception as err:  # pyarrow's schema errors: lines whose same field has different types
            reason = " ".join(str(err).split())[:200]
            raise GemstillError(f"{path}: datasets cannot read it ({reason}); give each field one type") from None
        # columns absent from a line come back as None: drop them so each line parses as written
        problems = [
            _parse_line({k: v for k, v in row.items() if v is not None}, f"{path} line {i + 1}")
            for i, row in enumerate(rows)
        ]
    return limit_per_kind(problems, limit)


def limit_per_kind(problems: list[ReasoningProblem], limit: int | None) -> list[ReasoningProblem]:
    if limit is None:
        return problems
    seen: dict[str, int] = {}
    kept = []
    for problem in problems:
        seen[problem.kind] = seen.get(problem.kind, 0) + 1
        if seen[problem.kind] <= limit:
            kept.append(problem)
    return kept


def generated_heldout(limit: int | None = None) -> list[ReasoningProblem]:
    """The held-out problems of the default generated corpus (`--problems generated`)."""
    from gemstill.data.config import GeneratedCorpusConfig
    from gemstill.data.generated import generate, is_heldout

    config = GeneratedCorpusConfig()
    return limit_per_kind(
        [from_generated(p) for p in generate(config) if is_heldout(p, config.heldout_fraction)], limit
    )


def suite_problems(settings: ReasoningConfig, data_dir: Path) -> list[ReasoningProblem]:
    """The problems a reasoning suite scores: the prepared data's held-out problems (generated data) and the
    settings' problem files, each kind limited to `settings.limit`."""
    from gemstill.shipped import resolve_problem_file

    heldout = Path(data_dir) / "heldout.jsonl"
    problems = load_problems(heldout, settings.limit) if heldout.is_file() and heldout.read_text().strip() else []
    for path in settings.problems:
        problems += load_problems(resolve_problem_file(path), settings.limit)
    if not problems:
        raise GemstillError(
            "reasoning evaluation has no problems: the data source holds none out; list jsonl files in "
            "reasoning.problems (GSM8K or Game-of-24 format)"
        )
    return problems
