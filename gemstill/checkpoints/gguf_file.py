"""GGUF checkpoints (llama.cpp's format) through gguf-py: every tensor type it dequantizes, metadata to config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from gemstill.checkpoints.names import is_norm, name_table
from gemstill.config import Gemma3Config
from gemstill.errors import GemstillError
from gemstill.layout import from_hf_layout, to_hf_layout
from gemstill.params import check_finite
from gemstill.quant.codec import GGUF_FORMATS, from_gguf_blocks, quantize_numpy, to_gguf_blocks
from gemstill.quant.packed import PackedWeight, float_array
from gemstill.quant.weights import check_params

ARCH = "gemma3"
# not read by llama.cpp (it derives the 27B query scale from the size); lets custom students round-trip exactly
_QUERY_SCALAR_KEY = "gemstill.query_pre_attn_scalar"
_LOCAL_ROPE_KEY = "gemstill.rope.local_freq_base"


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A reader for a GGUF file, with one-line errors for missing, truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise GemstillError(f"gguf:{path}: file not found; check the path (or use the gemma3-270m alias)")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # gguf-py raises ValueError/IndexError/struct errors on damaged files
        raise GemstillError(
            f"gguf:{path}: not a readable GGUF file ({type(err).__name__}: {err}); it is truncated or corrupt, "
            "re-create or re-download it"
        ) from None
    arch = field(reader, "general.architecture")
    if arch != ARCH:
        raise GemstillError(
            f"gguf:{path}: architecture is {arch!r}, not {ARCH!r}; gemstill loads Gemma 3 checkpoints only"
        )
    return reader


def _optional_f32(value: Any) -> float | None:
    return None if value is None or float(value) == 0.0 else _f32(value)


def _f32(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (9.9999997e-07 -> 1e-06)."""
    return float(f"{float(value):.7g}")


def field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    entry = reader.fields.get(key)
    return default if entry is None else entry.contents()


def config_from_gguf(reader: gguf.GGUFReader) -> Gemma3Config:
    """Our config from the gemma3.* metadata (local RoPE base and window pattern are fixed by the architecture)."""

    def arch(key: str, default: Any = None) -> Any:
        return field(reader, f"{ARCH}.{key}", default)

    layers, dim, heads = arch("block_count"), arch("embedding_length"), arch("attention.head_count")
    head_dim = arch("attention.key_length", dim // heads)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else _tensor_rows(reader, "token_embd.weight")
    scaling = arch("rope.scaling.type")
    # llama.cpp's rule for the published 27B: query scale (D / heads)^-0.5 instead of head_dim^-0.5
    default_scalar = dim / heads if (layers, dim) == (62, 5376) else head_dim
    return Gemma3Config(
        num_layers=layers,
        embed_dim=dim,
        hidden_dim=arch("feed_forward_length"),
        num_heads=heads,
        num_kv_heads=arch("attention.head_count_kv", heads),
        head_dim=head_dim,
        sliding_window=arch("attention.sliding_window", 4096),
        vocab_size=vocab,
        query_pre_attn_scalar=_f32(field(reader, _QUERY_SCALAR_KEY, default_scalar)),
        local_rope_base=_f32(arch("rope.freq_base_swa", field(reader, _LOCAL_ROPE_KEY, 10_000.0))),
        **_pattern(arch("attention.sliding_window_pattern", 6)),
        global_rope_base=_f32(arch("rope.freq_base", 1_000_000.0)),
        global_rope_scale=_f32(arch("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
        rms_norm_eps=_f32(arch("attention.layer_norm_rms_epsilon", 1e-6)),
        final_logit_softcap=_optional_f32(arch("final_logit_softcapping")),
        max_context=arch("context_length", 32_768),
    )


def _pattern(value: Any) -> dict[str, Any]:
    """llama.cpp's sliding_window_pattern, a period (layer i is global iff (i + 1) % period == 0) or a per-layer
    list of "uses the window" flags, as our config's fields."""
    if isinstance(value, int):
        return {"sliding_window_pattern": value}
    return {"layer_types": tuple("sliding_attention" if flag else "full_attention" for flag in value)}


def check_llama_cpp(config: Gemma3Config) -> None:
    """Refuse a model llama.cpp would compute differently from its GGUF (one line naming the knob)."""
    rule = config.embed_dim / config.num_heads if config.num_layers == 62 else config.head_dim
    if abs(config.query_pre_attn_scalar - rule) > 1e-6:
        raise GemstillError(
            f"query_pre_attn_scalar {config.query_pre_attn_scalar:g} differs from the {rule:g} llama.cpp derives for "
            f"a {config.num_layers}-layer Gemma 3, so llama.cpp would compute another model; export hf or orbax"
        )
    if config.attn_logit_softcap is not None:
        raise GemstillError("llama.cpp's Gemma 3 has no attention soft cap; export hf or orbax instead of gguf")
    if config.layer_types is not None:
        raise GemstillError(
            f"layer types {''.join('G' if t == 'full_attention' else 'L' for t in config.types)} follow no fixed "
            "local/global period, and llama.cpp's Gemma 3 reads a period only; export hf or orbax instead of gguf "
            "(or set student.layer_types: pattern)"
        )


def _tensor_rows(reader: gguf.GGUFReader, name: str) -> int:
    for tensor in reader.tensors:
        if tensor.name == name:
            return int(tensor.shape[-1])
    raise GemstillError(f"GGUF has no tensor {name}; the file is incomplete or not a Gemma 3 checkpoint")


# GGUF storage types by export name; q8_0/q4_0 blocks come from gemstill.quant, bf16 from gguf-py
QUANT_TYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
}
_PACKABLE = {gguf.GGMLQuantizationType.Q8_0: "q8_0", gguf.GGMLQuantizationType.Q4_0: "q4_0"}


def load_gguf(
    path: str | Path, packed: bool = False
) -> tuple[Gemma3Config, dict[str, np.ndarray | PackedWeight], gguf.GGUFReader]:
    """Config, our-layout parameters and the reader (for the tokenizer metadata) of a GGUF file.

    Weights are dequantized to float32, except with `packed`: Q8_0 and Q4_0 tensors then stay quantized in memory
    (PackedWeight, dequantized layer by layer inside the forward pass); other types are still dequantized.
    """
    reader = open_gguf(path)
    source = f"gguf:{path}"
    try:
        config = config_from_gguf(reader)
    except TypeError:
        raise GemstillError(f"{source}: gemma3.* metadata incomplete; the file is not a usable Gemma 3 GGUF") from None
    tensors = {t.name: t for t in reader.tensors}
    flat: dict[str, np.ndarray | PackedWeight] = {}
    for ours, (_, gguf_name) in name_table(config).items():
        tensor = tensors.get(gguf_name)
        if tensor is None:
            raise GemstillError(f"{source}: tensor {gguf_name} missing; the file is incomplete or not Gemma 3")
        if packed and tensor.tensor_type in _PACKABLE and not is_norm(ours):
            rows, features = _hf_shape(ours, config)
            fmt = _PACKABLE[tensor.tensor_type]
            codes, scales = from_gguf_blocks(tensor.data, fmt, rows, features)
            shape = from_hf_layout(ours, np.empty((rows, features), np.int8), config).shape
            flat[ours] = PackedWeight.pack(codes, scales, fmt, ours.rsplit(".", 1)[-1], shape)
            continue
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        except NotImplementedError:
            raise GemstillError(
                f"{source}: tensor {gguf_name} uses {tensor.tensor_type.name}, which gguf-py cannot dequantize; "
                "convert the file to a supported type (e.g. Q8_0, Q4_K, BF16)"
            ) from None
        if is_norm(ours):
            array = array - 1.0  # GGUF stores 1 + w
        flat[ours] = from_hf_layout(ours, array.reshape(_hf_shape(ours, config)), config)
    check_finite(flat, source)
    return config, flat, reader


def _hf_shape(ours: str, config: Gemma3Config) -> tuple[int, ...]:
    d, f, n, k, h = config.embed_dim, config.hidden_dim, config.num_heads, config.num_kv_heads, config.head_dim
    kind = ours.rsplit(".", 1)[-1]
    shapes = {
        "embedding": (config.vocab_size, d),
        "q_proj": (n * h, d),
        "k_proj": (k * h, d),
        "v_proj": (k * h, d),
        "o_proj": (d, n * h),
        "gate": (f, d),
        "up": (f, d),
        "down": (d, f),
    }
    if kind in shapes:
        return shapes[kind]
    return (h,) if ours.startswith("layers.") and ".attn." in ours else (d,)


def save_gguf(
    path: str | Path,
    config: Gemma3Config,
    flat: dict[str, Any],
    tokenizer_fields: dict[str, Any] | None = None,
    quant: str = "f32",
    name: str = "gemstill model",
    quantize_embedding: bool = True,
) -> Path:
    """Write a GGUF that llama.cpp and transformers load, atomically: F32 norms, weights stored as `quant`.

    quant: f32, f16, bf16, or the block formats q8_0 / q4_0 (gemstill.quant's blocks, byte-exact with ggml's).
    With a block format and quantize_embedding False, the tied embedding stays F32.
    """
    if quant not in QUANT_TYPES:
        raise GemstillError(f"unknown GGUF quantization {quant!r}; use one of {list(QUANT_TYPES)}")
    if quant in GGUF_FORMATS:
        check_params(config, quant, quantize_embedding)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(str(tmp), ARCH)
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPES[quant])
    writer.add_context_length(config.max_context)
    writer.add_embedding_length(config.embed_dim)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.global_rope_base)
    writer.add_sliding_window(config.sliding_window)
    if config.layer_types is None:
        writer.add_uint32(f"{ARCH}.attention.sliding_window_pattern", config.sliding_window_pattern)
    else:  # per layer, as llama.cpp's newer architectures write it: does layer i use the window
        writer.add_array(
            f"{ARCH}.attention.sliding_window_pattern", [not config.is_global(i) for i in range(len(config.types))]
        )
    writer.add_float32(f"{ARCH}.rope.freq_base_swa", float(config.local_rope_base))
    if config.final_logit_softcap is not None:
        writer.add_float32(f"{ARCH}.final_logit_softcapping", float(config.final_logit_softcap))
    if config.global_rope_scale != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.global_rope_scale)
    writer.add_float32(_QUERY_SCALAR_KEY, float(config.query_pre_attn_scalar))
    for key, value in (tokenizer_fields or {}).items():
        _add_field(writer, key, value)
    try:
        for ours, (_, gguf_name) in name_table(config).items():
            array = to_hf_layout(ours, float_array(flat[ours]), config)
            kind = "f32" if is_norm(ours) or (ours == "embedding" and not quantize_embedding) else quant
            if is_norm(ours):
                writer.add_tensor(gguf_name, array + 1.0)
            elif kind in ("f32", "f16"):
                writer.add_tensor(gguf_name, array.astype(np.float16 if kind == "f16" else np.float32))
            elif kind == "bf16":
                writer.add_tensor(
                    gguf_name, gguf.quants.quantize(array, QUANT_TYPES[kind]), raw_dtype=QUANT_TYPES[kind]
                )
            else:
                blocks = to_gguf_blocks(*quantize_numpy(array, kind), kind)
                writer.add_tensor(gguf_name, blocks, raw_dtype=QUANT_TYPES[kind])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)  # the partial file sits beside the target, so the rename is atomic
    finally:
        tmp.unlink(missing_ok=True)
    return path


_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}


def _add_field(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))
