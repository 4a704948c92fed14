"""Training FLOPs from the model config, and the accelerator's peak, for model FLOPs utilization (MFU).

Model FLOPs count the matrix multiplies a step needs, not what the implementation happens to run: remat's
recomputation is not counted (PaLM, appendix B). Per token, a forward pass costs 2 FLOPs per weight of every
projection (q, k, v, o, the three FFN matrices, the tied LM head) plus attention's two [T x S] products,
4 x heads x head_dim per attended key, where a causal token attends (T + 1) / 2 keys on average, or at most
the window on a local layer. Training is forward plus backward, three forward passes; a teacher run online
(for hidden or attention terms) adds one forward pass of the teacher.
"""

from __future__ import annotations

from gemstill.config import Gemma3Config

# dense bf16 peak FLOP/s per device, by jax's device_kind (prefix match, lower case)
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
    "nvidia h200": 989e12,
    "nvidia h100": 989e12,
    "nvidia a100": 312e12,
    "nvidia l4": 121e12,
}


def forward_flops_per_token(config: Gemma3Config, seq_len: int) -> float:
    d, heads, kv, hd = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim
    projections = d * hd * (2 * heads + 2 * kv) + 3 * d * config.hidden_dim
    flops = 2.0 * (config.num_layers * projections + config.vocab_size * d)
    for window in config.layer_windows:
        attended = (seq_len + 1) / 2 if window is None else min(window, (seq_len + 1) / 2)
        flops += 4.0 * heads * hd * attended
    return flops


def train_flops_per_token(student: Gemma3Config, seq_len: int, online_teacher: Gemma3Config | None = None) -> float:
    flops = 3.0 * forward_flops_per_token(student, seq_len)
    if online_teacher is not None:
        flops += forward_flops_per_token(online_teacher, seq_len)
    return flops


def peak_flops(device_kind: str) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None where none is known (CPUs): then no MFU is reported."""
    kind = device_kind.lower()
    for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(prefix):
            return PEAK_FLOPS[prefix]
    return None
