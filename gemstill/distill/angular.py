"""Depth pruning by measurement: which run of teacher blocks changes the residual stream least.

Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers"): the angular distance between the
hidden state entering block l and the one leaving block l + n - 1, arccos(cos(h_l, h_{l+n})) / pi averaged over
real tokens, is small where n consecutive blocks do little; dropping the n-block run with the smallest distance
hurts least. A student of S blocks keeps the teacher's T - (T - S) others, in order.
"""

from __future__ import annotations

import numpy as np


def angular_distances(hidden_states: list[np.ndarray]) -> np.ndarray:
    """[L, L] mean angular distance (in units of pi, 0..1) between hidden states i and j over the same tokens;
    `hidden_states` are the L = T + 1 states [N, D] (embedding output, then every block's output)."""
    units = []
    for h in hidden_states:
        h = np.asarray(h, np.float64)
        norms = np.linalg.norm(h, axis=-1, keepdims=True)
        units.append(h / np.where(norms > 0, norms, 1.0))
    count = len(units)
    distances = np.zeros((count, count))
    for i in range(count):
        for j in range(i + 1, count):
            cosine = np.clip(np.sum(units[i] * units[j], axis=-1), -1.0, 1.0)
            distances[i, j] = distances[j, i] = float(np.mean(np.arccos(cosine)) / np.pi)
    return distances


def least_changing_run(distances: np.ndarray, length: int) -> int:
    """The first block l of the `length` consecutive blocks whose removal changes the stream least: the l
    minimizing distances[l, l + length] (ties: the deepest, where the blocks are usually most redundant)."""
    layers = distances.shape[0] - 1
    if not 0 <= length <= layers:
        raise ValueError(f"cannot drop {length} of {layers} blocks")
    if length == 0:
        return layers
    scores = [distances[start, start + length] for start in range(layers - length + 1)]
    best = min(scores)
    return max(start for start, score in enumerate(scores) if score == best)


def kept_blocks(distances: np.ndarray, student_layers: int) -> list[int]:
    """The teacher blocks a student of `student_layers` keeps: all but the least-changing run."""
    layers = distances.shape[0] - 1
    start = least_changing_run(distances, layers - student_layers)
    dropped = set(range(start, start + layers - student_layers))
    return [block for block in range(layers) if block not in dropped]
