"""Memory estimates for any config: parameters, inference activations per token, KV cache per token.

The 5:1 design shows here: global layers' KV cache grows with the context, local layers' stays window-sized.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gemstill.config import Gemma3Config
from gemstill.params import count_params


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes, for one sequence."""

    param_bytes: int
    activation_bytes_per_token: int  # live at the widest point of a forward pass (MLP, attention or LM head)
    body_bytes_per_token: int  # the same, without the LM head (for callers that run the head in chunks)
    logit_bytes_per_token: int  # float32 logits over the vocabulary
    kv_bytes_per_token_global: int  # all global layers, per token of context
    kv_bytes_per_token_local: int  # all local layers, per token until the context reaches the window
    sliding_window: int
    num_heads: int

    def kv_cache_bytes(self, context: int) -> int:
        """Sampler cache for `context` tokens: local layers stop growing at the window (ring buffers)."""
        return self.kv_bytes_per_token_global * context + self.kv_bytes_per_token_local * min(
            context, self.sliding_window
        )

    def attention_score_bytes(self, tokens: int) -> int:
        """float32 attention scores of one layer in a cache-free forward over `tokens` (layers run in turn)."""
        return 4 * self.num_heads * tokens * tokens

    def forward_bytes(self, tokens: int) -> int:
        """Temporary memory of one inference forward pass over `tokens`, parameters excluded."""
        return tokens * self.activation_bytes_per_token + self.attention_score_bytes(tokens)

    def chunked_head_forward_bytes(self, sequences: int, seq_len: int, chunk: int) -> int:
        """A batched forward with the LM head run `chunk` tokens at a time (scoring, teacher cache)."""
        head = chunk * self.logit_bytes_per_token
        scores = sequences * self.attention_score_bytes(seq_len)
        return sequences * seq_len * self.body_bytes_per_token + max(head, scores)


def estimate(config: Gemma3Config) -> MemoryEstimate:
    compute = np.dtype(config.jnp_dtype).itemsize
    params = count_params(config)["total"] * np.dtype(config.jnp_param_dtype).itemsize
    d, f, n, k, h = config.embed_dim, config.hidden_dim, config.num_heads, config.num_kv_heads, config.head_dim
    mlp = compute * (2 * d + 3 * f)  # residual, normed input, gate, up, their product
    attention = compute * (2 * d + 2 * n * h + 2 * k * h)  # residual, input, q, k, v, output
    head = compute * d + 4 * config.vocab_size  # the float32 logits
    kv_per_layer = 2 * k * h * compute
    num_global = sum(w is None for w in config.layer_windows)
    return MemoryEstimate(
        param_bytes=params,
        activation_bytes_per_token=max(mlp, attention, head),
        body_bytes_per_token=max(mlp, attention),
        logit_bytes_per_token=4 * config.vocab_size,
        kv_bytes_per_token_global=num_global * kv_per_layer,
        kv_bytes_per_token_local=(config.num_layers - num_global) * kv_per_layer,
        sliding_window=config.sliding_window,
        num_heads=n,
    )


def human(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n_bytes) < 1024 or unit == "TiB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1024
    raise AssertionError("unreachable")
