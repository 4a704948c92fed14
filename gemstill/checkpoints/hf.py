"""Hugging Face checkpoints: `Gemma3ForCausalLM` and the text half of `Gemma3ForConditionalGeneration`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from gemstill.checkpoints.names import name_table
from gemstill.config import VOCAB_SIZE, Gemma3Config
from gemstill.errors import GemstillError
from gemstill.fsutil import atomic_dir
from gemstill.layout import from_hf_layout, to_hf_layout
from gemstill.params import check_finite
from gemstill.quant.packed import float_array

_TEXT_MODEL_TYPES = ("gemma3_text", "gemma3")
# where the text decoder's tensors live, by checkpoint generation
_PREFIXES = ("model.", "language_model.model.", "model.language_model.")


def config_from_hf(raw: dict[str, Any], source: str) -> Gemma3Config:
    """Our config from an HF config.json (a conditional-generation config contributes its text_config)."""
    model_type = raw.get("model_type")
    if model_type == "gemma3":
        raw = raw.get("text_config") or {}
        model_type = raw.get("model_type", "gemma3_text")
    if model_type not in _TEXT_MODEL_TYPES:
        raise GemstillError(
            f"{source}: model_type {model_type!r} is not Gemma 3; gemstill loads Gemma-3-architecture checkpoints only"
        )
    integers = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "sliding_window", "vocab_size", "max_position_embeddings")  # fmt: skip
    for name in integers:
        if raw.get(name) is not None and (not isinstance(raw[name], int) or isinstance(raw[name], bool)):
            raise GemstillError(
                f"{source}: config.json has {name} = {raw[name]!r}, not an integer; fix it or re-download the model"
            )
    rope = raw.get("rope_parameters") or {}
    local_rope = rope.get("sliding_attention", {})
    global_rope = rope.get("full_attention", {})
    legacy_scaling = raw.get("rope_scaling") or {}
    scale = global_rope.get("factor", legacy_scaling.get("factor", 1.0))
    if global_rope.get("rope_type", legacy_scaling.get("rope_type", "linear")) not in ("linear", "default"):
        raise GemstillError(f"{source}: only linear RoPE scaling is supported, got {global_rope}")
    head_dim = raw.get("head_dim", 256)
    config = Gemma3Config(
        num_layers=raw["num_hidden_layers"],
        embed_dim=raw["hidden_size"],
        hidden_dim=raw["intermediate_size"],
        num_heads=raw["num_attention_heads"],
        num_kv_heads=raw["num_key_value_heads"],
        head_dim=head_dim,
        sliding_window=raw.get("sliding_window", 4096),
        vocab_size=min(raw.get("vocab_size", VOCAB_SIZE), VOCAB_SIZE),
        query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar", head_dim)),
        local_rope_base=float(local_rope.get("rope_theta", raw.get("rope_local_base_freq", 10_000.0))),
        global_rope_base=float(global_rope.get("rope_theta", raw.get("rope_theta", 1_000_000.0))),
        global_rope_scale=float(scale),
        sliding_window_pattern=raw.get("_sliding_window_pattern", raw.get("sliding_window_pattern", 6)),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_context=raw.get("max_position_embeddings", 32_768),
        attn_logit_softcap=raw.get("attn_logit_softcapping"),
        final_logit_softcap=raw.get("final_logit_softcapping"),
    )
    if raw.get("layer_types") is not None:  # per-layer types win over the pattern, as in transformers
        config = config.replace(layer_types=tuple(raw["layer_types"]))
    return config


def config_to_hf(config: Gemma3Config) -> dict[str, Any]:
    """An HF `Gemma3ForCausalLM` config.json for this model."""
    global_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.global_rope_base}
    if config.global_rope_scale != 1.0:
        global_rope = {"rope_type": "linear", "rope_theta": config.global_rope_base, "factor": config.global_rope_scale}
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": config.vocab_size,
        "hidden_size": config.embed_dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "sliding_window": config.sliding_window,
        "_sliding_window_pattern": config.sliding_window_pattern,
        "layer_types": list(config.types),
        "query_pre_attn_scalar": _int_if_whole(config.query_pre_attn_scalar),
        "rope_parameters": {
            "full_attention": global_rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": config.local_rope_base},
        },
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_context,
        "attn_logit_softcapping": config.attn_logit_softcap,
        "final_logit_softcapping": config.final_logit_softcap,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
        "pad_token_id": 0,
        "torch_dtype": config.param_dtype,
    }


def _int_if_whole(value: float) -> float | int:
    """transformers' config validation wants an int where the value is whole (256, 168)."""
    return int(value) if float(value).is_integer() else value


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / s for s in shards]
    return sorted(directory.glob("*.safetensors"))


def hf_config(directory: Path) -> Gemma3Config:
    """Our config from the directory's config.json."""
    source = f"hf:{directory}"
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise GemstillError(f"{source}: no config.json; point hf: at a Hugging Face model directory")
    try:
        return config_from_hf(json.loads(config_path.read_text()), source)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError) as err:
        raise GemstillError(f"{source}: config.json is unreadable or incomplete ({err}); re-download it") from None
    except (TypeError, ValueError) as err:  # a value of the wrong type ("hidden_size": "640")
        reason = " ".join(str(err).split())[:160]
        raise GemstillError(
            f"{source}: config.json has a value of the wrong type ({reason}); fix or re-download it"
        ) from None


def load_hf(directory: str | Path) -> tuple[Gemma3Config, dict[str, np.ndarray]]:
    """Config and our-layout parameters from an HF model directory (safetensors)."""
    directory = Path(directory)
    source = f"hf:{directory}"
    config = hf_config(directory)
    files = _weight_files(directory)
    missing = [f for f in files if not f.is_file()]
    if not files or missing:
        raise GemstillError(
            f"{source}: no safetensors weights found ({missing[0].name if missing else '*.safetensors'} missing); "
            "copy the model's .safetensors files into the directory"
        )
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        try:
            with safe_open(path, framework="numpy") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    for prefix in _PREFIXES:
                        if key.startswith(prefix) and ".vision" not in key:
                            tensors["model." + key[len(prefix) :]] = handle.get_tensor(key)
                            break
        except (SafetensorError, OSError) as err:
            raise GemstillError(f"{source}: {path.name} is corrupt or truncated ({err}); re-download it") from None
    flat = {}
    for ours, (hf_name, _) in name_table(config).items():
        if hf_name not in tensors:
            raise GemstillError(f"{source}: tensor {hf_name} missing; the checkpoint is incomplete or not Gemma 3")
        flat[ours] = from_hf_layout(ours, tensors[hf_name], config)
    # 4B+ conditional-generation checkpoints append 64 unused embedding rows; ids >= 262,144 never occur
    flat["embedding"] = flat["embedding"][: config.vocab_size]
    check_finite(flat, source)
    return config, flat


def save_hf(directory: str | Path, config: Gemma3Config, flat: dict[str, Any], dtype: str | None = None) -> Path:
    """Write config.json and model.safetensors that transformers' Gemma3ForCausalLM loads; atomic as a directory."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        write_hf(tmp, config, flat, dtype or config.param_dtype)
    return directory


_SAFETENSORS_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def write_hf(directory: Path, config: Gemma3Config, flat: dict[str, Any], dtype: str = "float32") -> None:
    """config.json and model.safetensors (weights stored in `dtype`) into an existing (scratch) directory."""
    (directory / "config.json").write_text(json.dumps(config_to_hf(config.replace(param_dtype=dtype)), indent=2))
    tensors = {
        hf_name: np.ascontiguousarray(
            to_hf_layout(ours, float_array(flat[ours]), config).astype(_SAFETENSORS_DTYPES[dtype])
        )
        for ours, (hf_name, _) in name_table(config).items()
    }
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
