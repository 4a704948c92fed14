"""Next-token targets of packed sequences: what students train on, evaluation scores and the teacher cache stores.

Its own module because the teacher cache, training and evaluation all need it, and none should import another
for it (a stage's code version follows its imports).
"""

from __future__ import annotations

import numpy as np


def prediction_mask(loss_mask: np.ndarray) -> np.ndarray:
    """[N, L] bool: positions whose next token is a loss target, the only ones whose distribution is stored."""
    return np.pad(loss_mask[:, 1:] > 0, ((0, 0), (0, 1)))


def next_token_targets(tokens: np.ndarray, loss_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels [N, L] int32 (position i predicts token i + 1; 0 at the end) and their float32 weights
    (prediction_mask)."""
    labels = np.pad(tokens[:, 1:], ((0, 0), (0, 1))).astype(np.int32)
    return labels, prediction_mask(loss_mask).astype(np.float32)
