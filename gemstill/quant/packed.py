"""A weight kept quantized in memory (PackedWeight), dequantized inside the jitted pass one layer at a time.

It sits below the model: the model computes with a PackedWeight wherever a float weight could be.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemstill.layout import hf_to_ours
from gemstill.quant.codec import dequantize_codes


def _unpack_nibbles(codes: jax.Array, fmt: str) -> jax.Array:
    """int8 codes [rows, in] from PackedWeight storage (q4_0 holds columns j and j + in/2 in one byte)."""
    if fmt != "q4_0":
        return codes
    low = (codes & 0x0F).astype(jnp.int8) - 8
    high = ((codes >> 4) & 0x0F).astype(jnp.int8) - 8
    return jnp.concatenate([low, high], axis=-1)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["codes", "scales"], meta_fields=["fmt", "kind", "shape"]
)
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A weight kept quantized in memory: HF-layout codes [rows, in] (int8; q4_0 packs two per byte) and scales.

    `dequantize` rebuilds the float weight in our layout inside the jitted forward pass, one layer at a time, so
    a loaded model never holds a float32 copy of its weights; `rows` dequantizes only the embedding rows looked up.
    """

    codes: jax.Array
    scales: jax.Array
    fmt: str
    kind: str  # our parameter kind (q_proj, o_proj, gate, embedding, ...): how HF's layout maps to ours
    shape: tuple[int, ...]  # our layout

    @classmethod
    def pack(cls, codes: np.ndarray, scales: np.ndarray, fmt: str, kind: str, shape: tuple[int, ...]) -> PackedWeight:
        if fmt == "q4_0":
            half = codes.shape[1] // 2
            unsigned = (np.asarray(codes) + 8).astype(np.uint8)
            codes = unsigned[:, :half] | (unsigned[:, half:] << np.uint8(4))
        return cls(jnp.asarray(codes), jnp.asarray(scales), fmt, kind, tuple(int(n) for n in shape))

    def dequantize(self) -> jax.Array:
        """The float32 weight in our layout."""
        hf = dequantize_codes(_unpack_nibbles(self.codes, self.fmt), self.scales, self.fmt)
        return hf_to_ours(self.kind, hf, self.shape)

    def rows(self, ids: jax.Array) -> jax.Array:
        """float32 rows ids of a [rows, in] weight (the embedding lookup), leaving the other rows packed."""
        codes = self.codes[ids].reshape(-1, self.codes.shape[-1])
        scales = self.scales[ids].reshape(codes.shape[0], *self.scales.shape[1:])
        values = dequantize_codes(_unpack_nibbles(codes, self.fmt), scales, self.fmt)
        return values.reshape(*ids.shape, values.shape[-1])

    @property
    def nbytes(self) -> int:
        return int(self.codes.size * self.codes.dtype.itemsize + self.scales.size * self.scales.dtype.itemsize)


def float_array(value: Any) -> np.ndarray:
    """A parameter as a float32 host array, whether it is an array or a PackedWeight."""
    if isinstance(value, PackedWeight):
        value = value.dequantize()
    return np.asarray(value, np.float32)
