"""Which keys a query sees: the one attention-mask rule of the dense model and of every attention kernel."""

from __future__ import annotations

import jax


def attention_mask(
    query_pos: jax.Array,
    key_pos: jax.Array,
    window: int | None,
    segments: jax.Array | None = None,
    key_segments: jax.Array | None = None,
) -> jax.Array:
    """[B, T, S] visibility from positions; key_pos == -1 marks padding or an empty cache slot.

    With `segments` [B, T] (packed documents, no cache), a query sees only keys of its own segment; the keys'
    segment ids are `key_segments` [B, S] when they differ from the queries' (a key prefix), else `segments`.
    """
    delta = query_pos[:, :, None] - key_pos[:, None, :]
    mask = (key_pos[:, None, :] >= 0) & (delta >= 0)
    if window is not None:
        mask &= delta < window
    if segments is not None:
        keys = segments if key_segments is None else key_segments
        mask &= segments[:, :, None] == keys[:, None, :]
    return mask
