"""Which weights of a Gemma 3 model the quantizer touches, and the model-level operations over them: deployed
bytes, the block check, round-to-nearest params, packed params and QAT's fake-quantized params.

Above the params and checkpoint name tables (it reads a config's parameter shapes and GGUF names); the codec and
PackedWeight below the model do the arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemstill.checkpoints.names import name_table
from gemstill.config import Gemma3Config
from gemstill.layout import from_hf_layout, to_hf_layout
from gemstill.params import expected_shapes
from gemstill.quant.codec import BLOCK, check_shape, dequantize_numpy, fake_quant, quantize_numpy
from gemstill.quant.packed import PackedWeight

# our parameter-name suffixes of the linear layers (every matmul weight but the tied embedding)
LINEAR_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "up", "down")


def deployed_bytes(config: Gemma3Config, fmt: str | None, include_embedding: bool) -> int:
    """Bytes the weights take stored in `fmt` (None: float32): what a GGUF's tensors or packed memory hold."""
    total = 0
    for name, shape in expected_shapes(config).items():
        size = int(np.prod(shape))
        if fmt is None or not is_quantized_name(name, include_embedding):
            total += 4 * size
        elif fmt == "int8":
            total += size + 4 * hf_shape(config, name, shape)[0]  # int8 codes and a float32 scale per row
        else:
            total += size // BLOCK * (2 + (BLOCK if fmt == "q8_0" else BLOCK // 2))  # fp16 scale + codes
    return total


def is_quantized_name(name: str, include_embedding: bool) -> bool:
    """Whether a parameter is quantized: every linear layer, and the tied embedding / LM head when asked."""
    kind = name.rsplit(".", 1)[-1]
    return kind in LINEAR_KINDS or (include_embedding and name == "embedding")


def check_params(config: Gemma3Config, fmt: str, include_embedding: bool) -> None:
    """Refuse, before any work, a model whose quantized weights do not split into blocks (names the tensor)."""
    for name, shape in expected_shapes(config).items():
        if is_quantized_name(name, include_embedding):
            check_shape(gguf_name(config, name), hf_shape(config, name, shape), fmt)


def gguf_name(config: Gemma3Config, name: str) -> str:
    return name_table(config)[name][1]


def hf_shape(config: Gemma3Config, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The [out, in] shape HF and GGUF store a weight of our shape in."""
    return jax.eval_shape(lambda a: to_hf_layout(name, a, config), jax.ShapeDtypeStruct(shape, jnp.float32)).shape


def quantized_params(
    config: Gemma3Config, flat: Mapping[str, Any], fmt: str, include_embedding: bool
) -> dict[str, np.ndarray]:
    """Post-training round-to-nearest: float32 params (our layout) whose quantized weights lie on fmt's grid."""
    check_params(config, fmt, include_embedding)
    out = {}
    for name, value in flat.items():
        value = np.asarray(value, np.float32)
        if is_quantized_name(name, include_embedding):
            value = from_hf_layout(name, dequantize_numpy(to_hf_layout(name, value, config), fmt), config)
        out[name] = value
    return out


def packed_params(config: Gemma3Config, flat: Mapping[str, Any], fmt: str, include_embedding: bool) -> dict[str, Any]:
    """Params with every quantized weight kept packed (PackedWeight) for inference; the rest unchanged."""
    check_params(config, fmt, include_embedding)
    out: dict[str, Any] = {}
    for name, value in flat.items():
        if is_quantized_name(name, include_embedding) and not isinstance(value, PackedWeight):
            codes, scales = quantize_numpy(to_hf_layout(name, np.asarray(value, np.float32), config), fmt)
            value = PackedWeight.pack(codes, scales, fmt, name.rsplit(".", 1)[-1], np.shape(value))
        out[name] = value
    return out


def fake_quant_params(
    config: Gemma3Config, params: Mapping[str, jax.Array], fmt: str, include_embedding: bool
) -> dict[str, jax.Array]:
    """Our-layout params with every quantized weight fake-quantized (QAT's forward pass; identity gradient)."""
    out = dict(params)
    for name, value in params.items():
        if is_quantized_name(name, include_embedding):
            out[name] = from_hf_layout(name, fake_quant(to_hf_layout(name, value, config), fmt), config)
    return out
