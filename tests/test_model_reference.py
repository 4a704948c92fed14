"""Our Gemma 3 against transformers' Gemma3ForCausalLM on the same random weights, through every weight mapping.

Tolerance: fp32 log-probabilities agree to 1e-4 on these tiny models (max |delta|).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY, TINY_SCALED
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM

from gemstill.checkpoints.gguf_file import load_gguf, save_gguf
from gemstill.checkpoints.hf import config_to_hf, load_hf, save_hf
from gemstill.config import Gemma3Config
from gemstill.model import build_model
from gemstill.params import from_flat, to_flat

TOL = 1e-4
SEQ = 21  # longer than the window of 8: local and global layers differ
# per-layer types that follow no period (a student keeping its teacher blocks' types): G L G L L L G
TINY_TYPED = TINY.replace(
    layer_types=(
        "full_attention",
        *("sliding_attention", "full_attention"),
        *3 * ("sliding_attention",),
        "full_attention",
    )
)
CONFIGS = pytest.mark.parametrize("config", [TINY, TINY_SCALED, TINY_TYPED], ids=["tiny", "tiny-scaled", "tiny-typed"])


def _randomize(flat: dict, seed: int) -> dict[str, np.ndarray]:
    """Random values everywhere, norms included (they are zeros at init, which would hide a mapping bug)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in flat.items():
        scale = 0.3 if name.endswith(".scale") else 0.15
        out[name] = rng.normal(0, scale, np.shape(value)).astype(np.float32)
    return out


def _our_logprobs(config: Gemma3Config, flat: dict, tokens: np.ndarray) -> np.ndarray:
    model = from_flat(config, flat)
    return np.asarray(jax.nn.log_softmax(model(jnp.asarray(tokens)).logits, axis=-1))


def _hf_logprobs(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor(tokens, dtype=torch.long)).logits.float()
    return torch.log_softmax(logits, dim=-1).numpy()


def _tokens(config: Gemma3Config, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(1).integers(0, config.vocab_size, size=(batch, SEQ))


@CONFIGS
def test_hf_checkpoint_loads_into_ours(tmp_path, config):
    """HF -> ours: a transformers model saved with save_pretrained gives the same log-probs in gemstill."""
    from transformers import Gemma3TextConfig

    torch.manual_seed(0)
    hf_config = Gemma3TextConfig(**{k: v for k, v in config_to_hf(config).items() if k != "torch_dtype"})
    reference = Gemma3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0, 0.15)
    reference.config._attn_implementation = "eager"
    reference.save_pretrained(tmp_path / "hf")
    loaded_config, flat = load_hf(tmp_path / "hf")
    assert loaded_config == config
    tokens = _tokens(config)
    delta = np.abs(_our_logprobs(loaded_config, flat, tokens) - _hf_logprobs(reference, tokens)).max()
    assert delta < TOL


@CONFIGS
def test_our_checkpoint_loads_into_transformers(tmp_path, config):
    """Ours -> HF: save_hf output loads in transformers and gives the same log-probs."""
    flat = _randomize(to_flat(build_model(config)), seed=2)
    save_hf(tmp_path / "out", config, flat)
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert isinstance(reference, Gemma3ForCausalLM)
    tokens = _tokens(config)
    delta = np.abs(_our_logprobs(config, flat, tokens) - _hf_logprobs(reference, tokens)).max()
    assert delta < TOL


def test_gguf_round_trip_and_transformers_reads_it(tmp_path):
    """Ours -> GGUF -> ours is exact, and transformers' GGUF loader sees the same model (norms stored as 1+w)."""
    # transformers' GGUF loader reads no query scale and assumes 256 (right for every published size but 27B)
    config = TINY.replace(query_pre_attn_scalar=256.0)
    flat = _randomize(to_flat(build_model(config)), seed=3)
    vocab = {  # a toy vocabulary: transformers reads the vocab size from the tokenizer metadata
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"tok{i}" for i in range(4, 512)],
        "tokenizer.ggml.scores": [0.0] * 512,
        "tokenizer.ggml.token_type": [3, 3, 3, 2] + [1] * 508,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
    }
    path = save_gguf(tmp_path / "tiny.gguf", config, flat, tokenizer_fields=vocab)
    loaded_config, loaded, _ = load_gguf(path)
    assert loaded_config == config
    for name, value in flat.items():
        np.testing.assert_allclose(loaded[name], value, atol=1e-6, err_msg=name)
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="tiny.gguf", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = _tokens(config)
    assert reference.config.sliding_window == config.sliding_window
    delta = np.abs(_our_logprobs(config, flat, tokens) - _hf_logprobs(reference, tokens)).max()
    assert delta < TOL


def test_per_layer_types_round_trip_and_refuse_what_cannot_hold_them(tmp_path):
    """layer_types survives HF config export/import, Orbax and our GGUF (a per-layer array); llama.cpp's Gemma 3 reads a
    period only, so a GGUF export for it is refused in one line; a wrong list is refused naming the field."""
    from gemstill.checkpoints.gguf_file import check_llama_cpp
    from gemstill.checkpoints.hf import config_from_hf
    from gemstill.errors import GemstillError

    assert config_to_hf(TINY_TYPED)["layer_types"] == list(TINY_TYPED.types)
    assert config_from_hf(config_to_hf(TINY_TYPED), "test") == TINY_TYPED
    assert config_from_hf(config_to_hf(TINY), "test").layer_types is None  # the pattern stays the pattern
    every_other = tuple(("sliding_attention", "full_attention")[i % 2] for i in range(7))  # L G L G L G L
    assert TINY.replace(layer_types=every_other) == TINY.replace(sliding_window_pattern=2)  # a period is a period
    flat = to_flat(build_model(TINY_TYPED))
    loaded_config, _, _ = load_gguf(save_gguf(tmp_path / "typed.gguf", TINY_TYPED, flat))
    assert loaded_config == TINY_TYPED
    from gemstill.checkpoints.native import load_native, save_native

    save_native(tmp_path / "native", TINY_TYPED, flat, b"tokenizer")
    assert load_native(tmp_path / "native")[0] == TINY_TYPED
    with pytest.raises(GemstillError, match=r"layer types GLGLLLG follow no fixed local/global period") as error:
        check_llama_cpp(TINY_TYPED)
    assert "\n" not in str(error.value)
    with pytest.raises(GemstillError, match="layer_types has 3 entries but num_layers is 7"):
        TINY.replace(layer_types=("full_attention",) * 3)
    with pytest.raises(GemstillError, match=r"layer_types \['chunked'\] are not among"):
        TINY.replace(layer_types=("chunked",) * 7)


def _random_pair(tmp_path, seed: int) -> tuple[dict, torch.nn.Module]:
    """Random TINY parameters, and transformers' eager model loaded from them (through save_hf)."""
    flat = _randomize(to_flat(build_model(TINY)), seed=seed)
    save_hf(tmp_path / "out", TINY, flat)
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return flat, reference


def test_hidden_states_match_transformers(tmp_path):
    """Per-layer hidden states (what layer distillation consumes) equal transformers' at every layer."""
    flat, reference = _random_pair(tmp_path, seed=4)
    tokens = _tokens(TINY)
    with torch.no_grad():
        ref = reference(torch.tensor(tokens), output_hidden_states=True).hidden_states
    ours = from_flat(TINY, flat)(jnp.asarray(tokens), return_hidden=True).hidden_states
    assert len(ours) == TINY.num_layers + 1
    # transformers' last entry is after the final norm; every earlier one is a block output
    for layer in range(TINY.num_layers):
        np.testing.assert_allclose(np.asarray(ours[layer]), ref[layer].numpy(), rtol=1e-4, atol=1e-4)


def test_attention_probs_match_transformers(tmp_path):
    """Attention probabilities of a local and the global layer equal transformers' eager attention weights."""
    flat, reference = _random_pair(tmp_path, seed=5)
    tokens = _tokens(TINY)
    with torch.no_grad():
        ref = reference(torch.tensor(tokens), output_attentions=True).attentions
    ours = from_flat(TINY, flat)(jnp.asarray(tokens), attention_prob_layers=(0, 5)).attention_probs
    assert sorted(ours) == [0, 5]
    for layer in (0, 5):
        np.testing.assert_allclose(np.asarray(ours[layer]), ref[layer].numpy(), atol=1e-5)
