"""Array layouts: ours and the [out, in] layout Hugging Face and GGUF store weights in, by parameter kind.

Low in the house: the packed weights below the model and the checkpoint formats above it both convert with these.
"""

from __future__ import annotations

import numpy as np

from gemstill.config import Gemma3Config


def kind_of(ours: str) -> str:
    """A parameter's kind: the last part of its name (q_proj, gate, scale, embedding, ...)."""
    return ours.rsplit(".", 1)[-1] if "." in ours else ours


def to_hf_layout(ours: str, array: np.ndarray, config: Gemma3Config) -> np.ndarray:
    """Our array -> HF's [out, in] layout."""
    kind = kind_of(ours)
    if kind in ("q_proj", "k_proj", "v_proj"):  # (D, heads, H) -> (heads*H, D)
        return array.transpose(1, 2, 0).reshape(-1, array.shape[0])
    if kind == "o_proj":  # (N, H, D) -> (D, N*H)
        return array.reshape(-1, array.shape[-1]).T
    if kind in ("gate", "up", "down"):
        return array.T
    return array


def from_hf_layout(ours: str, array: np.ndarray, config: Gemma3Config) -> np.ndarray:
    """HF's [out, in] array -> our layout (the inverse of to_hf_layout)."""
    d, h = config.embed_dim, config.head_dim
    return hf_to_ours(
        kind_of(ours), array, (d, -1, h) if kind_of(ours) in ("q_proj", "k_proj", "v_proj") else (-1, h, d)
    )


def hf_to_ours(kind: str, array, shape: tuple[int, ...]):
    """HF's [out, in] array (numpy or jax) -> our layout of the given shape, for a parameter kind.

    q/k/v_proj ours (D, heads, H); o_proj ours (heads, H, D); gate/up/down ours [in, out]; the rest unchanged.
    """
    if kind in ("q_proj", "k_proj", "v_proj"):
        d, _, h = shape
        return array.reshape(-1, h, d).transpose(2, 0, 1)
    if kind == "o_proj":
        return array.T.reshape(shape)
    if kind in ("gate", "up", "down"):
        return array.T
    return array
