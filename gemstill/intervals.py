"""95% intervals for the claims a report makes, by the percentile bootstrap over independent units.

A held-out score is a ratio of sums over documents (NLL summed over a document's target tokens, divided by the
tokens of all documents): the unit of resampling is the document, never the token, whose losses within one
document are not independent. A paired claim (student against baseline, on the same documents) resamples the
documents once for both sides, so what is shared cancels. `draws` can be given (a [resamples, units] index
matrix) so a test can compute an interval by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
SEED = 0


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate and its 95% bootstrap interval."""

    estimate: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """Whether the interval excludes zero (the claim's sign holds at the 95% level)."""
        return self.low > 0 or self.high < 0

    def describe(self, unit: str = "", percent: bool = False) -> str:
        """`-0.128 [-0.161, -0.095]`, with "not significant" appended where the interval crosses zero."""

        def shown(value: float) -> str:
            return f"{value:.0%}" if percent else f"{value:+.4f}{unit}"

        text = f"{shown(self.estimate)} [95% CI {shown(self.low)}, {shown(self.high)}]"
        return text if self.significant else f"{text}, not significant"

    def to_json(self) -> dict[str, float | bool]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "significant": self.significant}


def draws_for(units: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """The index matrix [resamples, units] of a bootstrap: units drawn with replacement, seeded (reproducible)."""
    return np.random.default_rng(seed).integers(0, units, size=(resamples, units))


def bootstrap(
    statistic: Callable[[np.ndarray], float], units: int, draws: np.ndarray | None = None, level: float = LEVEL
) -> Interval:
    """statistic(all unit indices) and its percentile interval over statistic(indices of each resample)."""
    if units < 2:
        raise ValueError(f"a bootstrap needs at least two units, got {units}")
    draws = draws_for(units) if draws is None else np.asarray(draws)
    estimate = float(statistic(np.arange(units)))
    values = np.array([statistic(row) for row in draws], dtype=np.float64)
    values = values[np.isfinite(values)]  # a resample whose denominator vanished says nothing
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high))


def ratio(numerators: np.ndarray, denominators: np.ndarray) -> Callable[[np.ndarray], float]:
    """The statistic sum(numerators[i]) / sum(denominators[i]) over the drawn units i: a mean per token when
    numerators are per-document sums and denominators per-document token counts."""
    return lambda index: float(numerators[index].sum() / denominators[index].sum())
