"""What `gemstill info` reports about a model: its config, parameter counts and memory figures, computed from a
variant name (no weights needed) or a checkpoint spec (only its config is read; a GGUF's tensor sizes too)."""

from __future__ import annotations

from typing import Any


def model_info(spec: str, context: int = 8192, dtype: str = "float32", param_dtype: str = "float32") -> dict[str, Any]:
    """{model, config, params, memory}: the config with these dtypes, count_params, and the memory estimate in
    bytes (KV cache at `context` tokens, with and without ring buffers; for a GGUF also the bytes its weights take
    in the file, per tensor type and in all)."""
    from gemstill.config import VARIANTS
    from gemstill.memory import estimate
    from gemstill.params import count_params

    if spec in VARIANTS:
        config = VARIANTS[spec]
    else:
        from gemstill.loading import load_checkpoint_config

        config = load_checkpoint_config(spec)
    config = config.replace(param_dtype=param_dtype, dtype=dtype)
    counts = count_params(config)
    mem = estimate(config)
    figures = {
        "param_bytes": mem.param_bytes,
        "activation_bytes_per_token": mem.activation_bytes_per_token,
        "kv_cache_bytes_per_token_global_layers": mem.kv_bytes_per_token_global,
        "kv_cache_bytes_per_token_local_layers": mem.kv_bytes_per_token_local,
        f"kv_cache_bytes_at_{context}": mem.kv_cache_bytes(context),
        f"kv_cache_bytes_at_{context}_without_ring_buffers": (
            mem.kv_bytes_per_token_global + mem.kv_bytes_per_token_local
        )
        * context,
    }
    if spec not in VARIANTS and spec.startswith("gguf:"):
        from gemstill.checkpoints.gguf_file import open_gguf

        reader = open_gguf(spec.partition(":")[2])
        for tensor in reader.tensors:  # the bytes the weights take in the file (and packed, in memory)
            key = f"weight_bytes_{tensor.tensor_type.name.lower()}"
            figures[key] = figures.get(key, 0) + int(tensor.n_bytes)
        figures["weight_bytes_in_file"] = sum(int(t.n_bytes) for t in reader.tensors)
    return {"model": spec, "config": config.to_dict(), "params": counts, "memory": figures}
