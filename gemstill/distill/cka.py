"""Linear CKA between a teacher's block outputs, and the teacher layers that best cover its depth.

Linear CKA (Kornblith et al. 2019) compares two representations X [N, D1], Y [N, D2] of the same N tokens:
after centering every column, CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F). It is 1 for identical
representations and invariant to orthogonal transforms and isotropic scaling, so it says which layers compute
much the same thing: a student with few layers should learn from teacher layers that are not redundant.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemstill import distributed
from gemstill.errors import GemstillError
from gemstill.model import Gemma3

DEFAULT_MAX_TOKENS = 2048  # tokens entering CKA: enough for a stable estimate, small enough for [N, N] Gram matrices
_SAMPLE_SEED = 0
_BATCH_ROWS = 4  # sequences per teacher forward: bounds the memory of all block outputs at once


def _centered(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x - x.mean(axis=0, keepdims=True)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two representations [N, D1] and [N, D2] of the same N tokens, in float64."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise GemstillError(f"linear CKA needs [N, D] arrays of the same N tokens, got {x.shape} and {y.shape}")
    x, y = _centered(x), _centered(y)
    denominator = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(np.linalg.norm(y.T @ x) ** 2 / denominator) if denominator > 0 else 0.0


def cka_matrix(features: Sequence[np.ndarray]) -> np.ndarray:
    """Symmetric [L, L] linear CKA between every pair of representations [N, D] of the same N tokens.

    With fewer tokens than dimensions the centered Gram matrices [N, N] are compared (their Frobenius inner
    product equals ||Y^T X||_F^2); otherwise the [D, D] cross products, whichever is smaller.
    """
    centered = [_centered(f) for f in features]
    tokens = {c.shape[0] for c in centered}
    if len(tokens) != 1 or any(c.ndim != 2 for c in centered):
        raise GemstillError("CKA matrix: every representation must be [N, D] over the same N tokens")
    count = len(centered)
    sim = np.zeros((count, count))
    if centered[0].shape[0] <= max(c.shape[1] for c in centered):
        grams = [c @ c.T for c in centered]
        norms = [np.linalg.norm(g) for g in grams]
        for i in range(count):
            for j in range(i, count):
                den = norms[i] * norms[j]
                sim[i, j] = sim[j, i] = np.vdot(grams[i], grams[j]) / den if den > 0 else 0.0
    else:
        norms = [np.linalg.norm(c.T @ c) for c in centered]
        for i in range(count):
            for j in range(i, count):
                den = norms[i] * norms[j]
                cross = np.linalg.norm(centered[j].T @ centered[i]) ** 2
                sim[i, j] = sim[j, i] = cross / den if den > 0 else 0.0
    return sim


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _hidden_states(
    graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array
) -> tuple[jax.Array, ...]:
    model = nnx.merge(graphdef, state)
    out = model(
        tokens, positions, mask=segment_ids > 0, segment_ids=segment_ids, return_logits=False, return_hidden=True
    )
    return out.hidden_states


def calibration_arrays(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A calibration batch's tokens, positions and segment ids as int32 (a clear error when one is missing)."""
    missing = [name for name in ("tokens", "positions", "segment_ids") if name not in batch]
    if missing:
        raise GemstillError(f"calibration batch lacks {missing}; pass rows of a prepared split (read_split)")
    return {name: np.asarray(batch[name], np.int32) for name in ("tokens", "positions", "segment_ids")}


def sample_batches(sample: Mapping[str, np.ndarray], rows: int) -> list[dict[str, np.ndarray]]:
    """The first `rows` sequences of a prepared split (tokens/positions/segment_ids), in forward-sized batches."""
    missing = [name for name in ("tokens", "positions", "segment_ids") if name not in sample]
    if missing:
        raise GemstillError(f"the calibration sample lacks {missing}; pass rows of a prepared split (read_split)")
    arrays = {name: np.asarray(sample[name])[:rows] for name in ("tokens", "positions", "segment_ids")}
    count = arrays["tokens"].shape[0]
    return [{name: a[i : i + _BATCH_ROWS] for name, a in arrays.items()} for i in range(0, count, _BATCH_ROWS)]


def sampled_hidden_states(
    model: Gemma3, batches: Iterable[Mapping[str, np.ndarray]], max_tokens: int = DEFAULT_MAX_TOKENS
) -> list[np.ndarray]:
    """The model's hidden states [T + 1] (the embedding, then every block's output) on the real
    (segment_ids > 0) tokens of `batches`, each [N, D] in float32.

    When the batches hold more than `max_tokens` real tokens, a fixed-seed random subset of that size is used,
    so the result depends on the data only, not on how it was batched.
    """
    batches = [calibration_arrays(b) for b in batches]
    real = [b["segment_ids"].reshape(-1) > 0 for b in batches]
    total = int(sum(r.sum() for r in real))
    if total < 2:
        raise GemstillError(
            f"layer statistics need at least 2 real tokens, the sample has {total}; give more sample sequences"
        )
    keep = np.ones(total, bool)
    if total > max_tokens:
        keep[:] = False
        keep[np.random.default_rng(_SAMPLE_SEED).choice(total, max_tokens, replace=False)] = True
    chosen, start = [], 0
    for mask in real:
        flat = np.flatnonzero(mask)
        chosen.append(flat[keep[start : start + flat.size]])
        start += flat.size
    work = [i for i, rows in enumerate(chosen) if rows.size]
    graphdef, state = nnx.split(model)
    replicas = distributed.on_each_device(state)

    def compute(j: int, device: jax.Device) -> list[jax.Array]:
        batch = {name: jax.device_put(a, device) for name, a in batches[work[j]].items()}
        states = _hidden_states(graphdef, replicas[device], batch["tokens"], batch["positions"], batch["segment_ids"])
        rows = jax.device_put(chosen[work[j]], device)
        return [hidden.reshape(-1, hidden.shape[-1])[rows].astype(jnp.float32) for hidden in states]

    # the batches split over processes and devices; every process gets every batch's rows, in batch order
    per_batch = distributed.map_batches("cka hidden states", len(work), compute)
    return [np.concatenate([np.asarray(layers[i]) for layers in per_batch]) for i in range(model.config.num_layers + 1)]


def teacher_cka(
    model: Gemma3, batches: Iterable[Mapping[str, np.ndarray]], max_tokens: int = DEFAULT_MAX_TOKENS
) -> np.ndarray:
    """Linear CKA [T, T] between the teacher's block outputs on the real tokens of `batches` (a fixed-seed
    subset of `max_tokens` of them when there are more)."""
    return cka_matrix(sampled_hidden_states(model, batches, max_tokens)[1:])


def choose_layers(similarity: np.ndarray, count: int) -> list[int]:
    """`count` layers (ascending, always the last) that greedily maximize coverage of a similarity matrix.

    coverage(C) = sum over layers t of max over c in C of similarity[t, c]: every layer should resemble one
    that was chosen. Greedy selection starts from the last layer; ties go to the later layer.
    """
    sim = np.asarray(similarity, np.float64)
    size = sim.shape[0]
    if sim.ndim != 2 or sim.shape != (size, size) or size == 0:
        raise GemstillError(f"choose_layers needs a square similarity matrix, got shape {sim.shape}")
    if not 1 <= count <= size:
        raise GemstillError(f"choose_layers: count={count} must be between 1 and the {size} layers")
    chosen = [size - 1]
    best = sim[:, size - 1].copy()  # per layer t: max similarity to any chosen layer
    while len(chosen) < count:
        gains = np.maximum(best[:, None], sim).sum(axis=0)  # coverage if each candidate were added
        gains[chosen] = -np.inf
        pick = int(size - 1 - np.argmax(gains[::-1]))  # argmax from the end: ties go to the later layer
        chosen.append(pick)
        best = np.maximum(best, sim[:, pick])
    return sorted(chosen)
