"""The pairwise claims an evaluation report makes, each with its 95% interval over held-out documents.

Student against baseline (NLL and KL differences, and the share of the baseline's gap to the teacher the student
closes), and QAT against PTQ per format. Both sides of a claim are scored on the same documents, so each resample
draws the documents once for both (gemstill.intervals).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from gemstill.distill.evaluate import DocumentScores
from gemstill.intervals import Interval, bootstrap, draws_for


@dataclasses.dataclass(frozen=True)
class Claim:
    name: str  # e.g. "student - baseline NLL"
    interval: Interval
    sentence: str  # what the report says

    def to_json(self) -> dict[str, Any]:
        return {"claim": self.name, **self.interval.to_json()}


def _mean(values: np.ndarray, tokens: np.ndarray, index: np.ndarray) -> float:
    return float(values[index].sum() / tokens[index].sum())


def difference(scores: DocumentScores, a: str, b: str, metric: str, draws: np.ndarray) -> Interval:
    """Mean per token of model a minus model b (metric "nll" or "kl"), resampling documents."""
    values = getattr(scores, metric)
    first, second = values[scores.index(a)], values[scores.index(b)]
    tokens = scores.tokens
    return bootstrap(lambda i: _mean(first, tokens, i) - _mean(second, tokens, i), len(tokens), draws)


def gap_closed(scores: DocumentScores, draws: np.ndarray) -> Interval:
    """(baseline NLL - student NLL) / (baseline NLL - teacher NLL): the share of the gap distillation closes."""
    teacher, student, baseline = (scores.nll[scores.index(n)] for n in ("teacher", "student", "baseline"))
    tokens = scores.tokens

    def share(i: np.ndarray) -> float:
        b, t = _mean(baseline, tokens, i), _mean(teacher, tokens, i)
        return (b - _mean(student, tokens, i)) / (b - t) if b != t else float("nan")

    return bootstrap(share, len(tokens), draws)


def report_claims(scores: DocumentScores, where: str = "") -> list[Claim]:
    """Every claim the models of `scores` support: student vs baseline (NLL, KL, gap closed) and, per format with
    both, QAT vs PTQ (NLL, KL). `where` qualifies the sentences (e.g. " out of domain")."""
    names = [c.name for c in scores.models]
    draws = draws_for(len(scores.tokens))
    claims = []
    if {"student", "baseline"} <= set(names):
        for metric, label in (("nll", "NLL"), ("kl", "KL to the teacher")):
            interval = difference(scores, "student", "baseline", metric, draws)
            better = "lower" if interval.estimate < 0 else "higher"
            claims.append(
                Claim(
                    f"student - baseline {metric}{where}",
                    interval,
                    f"Student minus baseline{where}, {label}: {interval.describe(' nats')} ({better} for the student).",
                )
            )
        closed = gap_closed(scores, draws)
        claims.append(
            Claim(
                f"gap closed{where}",
                closed,
                f"Share of the baseline's gap to the teacher the student closes{where}: "
                f"{closed.describe(percent=True)}.",
            )
        )
    for name in names:
        if not name.endswith("-qat") or (ptq := name.removesuffix("-qat") + "-ptq") not in names:
            continue
        fmt = name.removeprefix("student-").removesuffix("-qat")
        for metric, label in (("nll", "NLL"), ("kl", "KL")):
            interval = difference(scores, name, ptq, metric, draws)
            claims.append(
                Claim(
                    f"{fmt} qat - ptq {metric}{where}",
                    interval,
                    f"{fmt}: QAT minus round-to-nearest{where}, {label}: {interval.describe(' nats')}.",
                )
            )
    return claims
