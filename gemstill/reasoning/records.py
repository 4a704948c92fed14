"""Per-problem records and the score they add up to: anyone can recompute an accuracy from its records."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Record:
    id: str
    prompt: str
    output: str
    answer: str | None  # the extracted final answer
    correct: bool
    tokens: int  # generated tokens spent on the problem, every sample and search call included
    seconds: float  # its share of the batched calls' wall time (batch time split by prompts)
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)  # votes, search statistics


@dataclasses.dataclass(frozen=True)
class MethodResult:
    """One method (cot, sc, tot-b5, ...) of one model on a list of problems."""

    method: str
    records: list[Record]

    @property
    def correct(self) -> int:
        return sum(r.correct for r in self.records)

    @property
    def total(self) -> int:
        return len(self.records)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def tokens_per_problem(self) -> float:
        return sum(r.tokens for r in self.records) / self.total if self.total else 0.0

    @property
    def seconds_per_problem(self) -> float:
        return sum(r.seconds for r in self.records) / self.total if self.total else 0.0

    def to_json(self) -> dict[str, Any]:
        """The `--json` shape: accuracy, correct, total and the records."""
        return {
            "method": self.method,
            "accuracy": self.accuracy,
            "correct": self.correct,
            "total": self.total,
            "tokens_per_problem": self.tokens_per_problem,
            "records": [
                {
                    "id": r.id,
                    "prompt": r.prompt,
                    "output": r.output,
                    "answer": r.answer,
                    "correct": r.correct,
                    "tokens": r.tokens,
                    "seconds": round(r.seconds, 6),
                    **({"detail": r.detail} if r.detail else {}),
                }
                for r in self.records
            ],
        }
