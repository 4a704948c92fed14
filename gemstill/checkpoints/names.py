"""The one table of parameter names: ours, Hugging Face's and GGUF's, with the array transforms between them.

HF and (dequantized) GGUF arrays share the [out, in] layout; GGUF stores every norm weight as 1 + w.
"""

from __future__ import annotations

import numpy as np

from gemstill.config import Gemma3Config

# our per-layer name -> (HF suffix after "model.layers.N.", GGUF suffix after "blk.N.")
LAYER_NAMES = {
    "pre_attn_norm.scale": ("input_layernorm.weight", "attn_norm.weight"),
    "attn.q_proj": ("self_attn.q_proj.weight", "attn_q.weight"),
    "attn.k_proj": ("self_attn.k_proj.weight", "attn_k.weight"),
    "attn.v_proj": ("self_attn.v_proj.weight", "attn_v.weight"),
    "attn.o_proj": ("self_attn.o_proj.weight", "attn_output.weight"),
    "attn.q_norm.scale": ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    "attn.k_norm.scale": ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    "post_attn_norm.scale": ("post_attention_layernorm.weight", "post_attention_norm.weight"),
    "pre_ffw_norm.scale": ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
    "mlp.gate": ("mlp.gate_proj.weight", "ffn_gate.weight"),
    "mlp.up": ("mlp.up_proj.weight", "ffn_up.weight"),
    "mlp.down": ("mlp.down_proj.weight", "ffn_down.weight"),
    "post_ffw_norm.scale": ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
}
GLOBAL_NAMES = {
    "embedding": ("model.embed_tokens.weight", "token_embd.weight"),
    "final_norm.scale": ("model.norm.weight", "output_norm.weight"),
}


def name_table(config: Gemma3Config) -> dict[str, tuple[str, str]]:
    """Our name -> (HF name, GGUF name) for every parameter of the config."""
    table = dict(GLOBAL_NAMES)
    for i in range(config.num_layers):
        for ours, (hf, gg) in LAYER_NAMES.items():
            table[f"layers.{i}.{ours}"] = (f"model.layers.{i}.{hf}", f"blk.{i}.{gg}")
    return table


def _kind(ours: str) -> str:
    return ours.rsplit(".", 1)[-1] if "." in ours else ours


def to_hf_layout(ours: str, array: np.ndarray, config: Gemma3Config) -> np.ndarray:
    """Our array -> HF's [out, in] layout."""
    kind = _kind(ours)
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
    return hf_to_ours(_kind(ours), array, (d, -1, h) if _kind(ours) in ("q_proj", "k_proj", "v_proj") else (-1, h, d))


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


def is_norm(ours: str) -> bool:
    return ours.endswith(".scale")
