"""Checkpoint formats: native Orbax round trip, the multimodal HF layout, and one-line errors on bad input."""

from __future__ import annotations

import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY

from gemstill.checkpoints.gguf_file import load_gguf, save_gguf
from gemstill.checkpoints.hf import load_hf, save_hf
from gemstill.checkpoints.native import load_native, save_native
from gemstill.errors import GemstillError
from gemstill.loading import load_checkpoint, parse_spec
from gemstill.model import build_model
from gemstill.params import from_flat, to_flat


def test_native_round_trip_is_exact(tmp_path):
    config = TINY.replace(param_dtype="bfloat16")
    flat = to_flat(build_model(config, seed=3))
    save_native(tmp_path / "ckpt", config, flat, tokenizer_model=None)
    loaded_config, loaded = load_native(tmp_path / "ckpt")
    assert loaded_config == config
    assert loaded.keys() == flat.keys()
    for name, value in flat.items():
        assert loaded[name].dtype == value.dtype
        np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(value), err_msg=name)


def test_native_restore_with_sharding(tmp_path):
    """Arrays come back already placed by the given shardings (the path multi-device restores take)."""
    flat = to_flat(build_model(TINY))
    save_native(tmp_path / "ckpt", TINY, flat, tokenizer_model=None)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    _, loaded = load_native(tmp_path / "ckpt", shardings={"embedding": spec})
    assert loaded["embedding"].sharding == spec
    np.testing.assert_array_equal(np.asarray(loaded["embedding"]), np.asarray(flat["embedding"]))


def test_native_overwrite_is_atomic(tmp_path):
    """Saving over an existing checkpoint replaces it whole; no scratch directories are left behind."""
    save_native(tmp_path / "ckpt", TINY, to_flat(build_model(TINY, seed=1)), tokenizer_model=None)
    second = to_flat(build_model(TINY, seed=2))
    save_native(tmp_path / "ckpt", TINY, second, tokenizer_model=None)
    _, loaded = load_native(tmp_path / "ckpt")
    np.testing.assert_array_equal(np.asarray(loaded["embedding"]), np.asarray(second["embedding"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_conditional_generation_text_part_and_extra_vocab_rows(tmp_path):
    """Gemma3ForConditionalGeneration: vision tensors skipped, 262,208 embedding rows cut to 262,144."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    text = Gemma3TextConfig(
        vocab_size=262_208,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=8,
        query_pre_attn_scalar=16,
    )
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    torch.manual_seed(0)
    reference = Gemma3ForConditionalGeneration(
        Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    ).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0, 0.1)
    reference.save_pretrained(tmp_path / "mm")
    config, flat = load_hf(tmp_path / "mm")
    assert config.vocab_size == 262_144 and config.num_layers == 2
    tokens = np.random.default_rng(0).integers(0, 262_144, size=(1, 12))
    with torch.no_grad():
        ref = reference(input_ids=torch.tensor(tokens)).logits.float().numpy()[..., :262_144]
    ours = np.asarray(from_flat(config, flat)(jnp.asarray(tokens)).logits)
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)


def test_unknown_spec_scheme():
    with pytest.raises(GemstillError, match="not understood"):
        parse_spec("s3:bucket/model")
    with pytest.raises(GemstillError, match="not understood"):
        parse_spec("gemma3-9000m")


def test_missing_files(tmp_path):
    with pytest.raises(GemstillError, match="file not found"):
        load_checkpoint(f"gguf:{tmp_path / 'nope.gguf'}")
    with pytest.raises(GemstillError, match="directory not found"):
        load_checkpoint(f"hf:{tmp_path / 'nope'}")
    (tmp_path / "hf").mkdir()
    with pytest.raises(GemstillError, match=r"no config\.json"):
        load_checkpoint(f"hf:{tmp_path / 'hf'}")


def test_hf_dir_without_weights(tmp_path):
    save_hf(tmp_path / "hf", TINY, to_flat(build_model(TINY)))
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(GemstillError, match="no safetensors weights"):
        load_checkpoint(f"hf:{tmp_path / 'hf'}")


def test_truncated_safetensors(tmp_path):
    save_hf(tmp_path / "hf", TINY, to_flat(build_model(TINY)))
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(GemstillError, match="corrupt or truncated"):
        load_checkpoint(f"hf:{tmp_path / 'hf'}")


def test_truncated_gguf(tmp_path):
    path = save_gguf(tmp_path / "m.gguf", TINY, to_flat(build_model(TINY)))
    load_gguf(path)  # intact: loads
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])
    with pytest.raises(GemstillError, match="truncated or corrupt"):
        load_checkpoint(f"gguf:{path}")


def test_gguf_of_another_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GemstillError, match="architecture is 'llama', not 'gemma3'"):
        load_checkpoint(f"gguf:{tmp_path / 'llama.gguf'}")


def test_hf_config_of_another_architecture(tmp_path):
    save_hf(tmp_path / "hf", TINY, to_flat(build_model(TINY)))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["model_type"] = "llama"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(GemstillError, match="is not Gemma 3"):
        load_checkpoint(f"hf:{tmp_path / 'hf'}")
