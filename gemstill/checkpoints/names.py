"""The one table of parameter names: ours, Hugging Face's and GGUF's (the array layouts are gemstill.layout).

HF and (dequantized) GGUF arrays share the [out, in] layout; GGUF stores every norm weight as 1 + w.
"""

from __future__ import annotations

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


def is_norm(ours: str) -> bool:
    return ours.endswith(".scale")
