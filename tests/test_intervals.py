"""The bootstrap intervals of the reports, against cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from gemstill.intervals import Interval, bootstrap, draws_for, ratio

# three held-out documents: their target tokens and NLL summed over them, per model
TOKENS = np.array([10.0, 20.0, 10.0])
STUDENT = np.array([20.0, 30.0, 10.0])  # 60 / 40 = 1.5 nats per token
BASELINE = np.array([25.0, 50.0, 20.0])  # 95 / 40 = 2.375
TEACHER = np.array([15.0, 20.0, 5.0])  # 40 / 40 = 1.0
# four resamples, written down: the interval below is computed from them by hand
DRAWS = np.array([[0, 0, 1], [1, 2, 2], [0, 1, 2], [2, 2, 2]])


def test_a_paired_difference_by_hand():
    """student - baseline per resample: (70-100)/40 = -0.75, (50-90)/40 = -1, the full set -0.875, (30-60)/30 = -1;
    sorted -1, -1, -0.875, -0.75; numpy's linear percentiles at 2.5% and 97.5% of four values: -1 and
    -0.875 + 0.925 * 0.125 = -0.759375."""
    student, baseline = ratio(STUDENT, TOKENS), ratio(BASELINE, TOKENS)
    interval = bootstrap(lambda i: student(i) - baseline(i), 3, DRAWS)
    assert interval == Interval(-0.875, -1.0, -0.759375)
    assert interval.significant
    assert interval.describe(" nats") == "-0.8750 nats [95% CI -1.0000 nats, -0.7594 nats]"


def test_a_share_of_the_gap_by_hand_and_a_claim_that_is_not_significant():
    from gemstill.distill.claims import gap_closed
    from gemstill.distill.evaluate import DocumentScores

    scores = DocumentScores(
        models=tuple(_named(n) for n in ("teacher", "student", "baseline")),
        tokens=TOKENS,
        nll=np.stack([TEACHER, STUDENT, BASELINE]),
        kl=np.zeros((3, 3)),
    )
    # (2.375 - 1.5) / (2.375 - 1) on all documents; on the resample [2, 2, 2]: (2 - 1) / (2 - 0.5) = 2/3
    closed = gap_closed(scores, DRAWS[3:])
    assert closed.estimate == pytest.approx(0.875 / 1.375) and closed.low == closed.high == pytest.approx(2 / 3)
    assert Interval(0.1, -0.2, 0.3).describe(percent=True) == "10% [95% CI -20%, 30%], not significant"


def test_draws_are_seeded_and_a_lone_document_is_refused():
    assert (draws_for(5, 10, seed=3) == draws_for(5, 10, seed=3)).all() and draws_for(5, 10).shape == (10, 5)
    with pytest.raises(ValueError, match="at least two units"):
        bootstrap(lambda i: 0.0, 1)


def _named(name: str):
    from conftest import TINY

    from gemstill.distill.evaluate import Candidate

    return Candidate(name, TINY, {})
