"""The real Gemma 3 270M: gemstill against transformers on the same GGUF weights, and the CLI end to end.

Tolerance: float32 log-probabilities agree to max |delta| < 1e-3 (measured about 1.5e-4), on a prompt longer
than the 512-token sliding window; greedy continuations are equal token for token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gemstill.loading import load_model
from gemstill.sampler import Sampler, SamplingParams
from gemstill.scoring import Scorer

TOL = 1e-3
LONG_TEXT = " ".join(
    f"Step {i}: the distilled student copies the teacher's distribution over {i * 7 % 97} tokens, "
    f"and its loss at layer {i % 18} falls by {i % 11}.{i % 7} percent."
    for i in range(40)
)


@pytest.fixture(scope="module")
def reference(gemma3_270m_gguf):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(
        gemma3_270m_gguf.parent, gguf_file=gemma3_270m_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def ours(gemma3_270m_gguf):
    return load_model(f"gguf:{gemma3_270m_gguf}")


def _reference_logprobs(reference, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = reference(torch.tensor([ids])).logits.float()
    logprobs = torch.log_softmax(logits[0, :-1], dim=-1)
    return logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def test_long_prompt_logprobs_match_transformers(ours, reference):
    ids = ours.require_tokenizer().encode(LONG_TEXT)
    assert len(ids) > 600  # beyond the 512-token window: local and global layers both matter
    scored = Scorer(ours.model).logprobs([ids])[0]
    delta = np.abs(scored - _reference_logprobs(reference, ids))
    assert delta.max() < TOL
    # the full distribution too, not only the chosen tokens (first 300 positions)
    full = np.asarray(jax.nn.log_softmax(ours.model(jnp.asarray([ids[:300]])).logits[0], axis=-1))
    with torch.no_grad():
        ref = torch.log_softmax(reference(torch.tensor([ids[:300]])).logits[0].float(), -1).numpy()
    assert np.abs(full - ref).max() < TOL


def test_greedy_chat_continuation_matches_transformers(ours, reference):
    tokenizer = ours.require_tokenizer()
    prompts = [
        tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}]),
        tokenizer.encode_chat([{"role": "user", "content": "Count from one to five in words."}]),
    ]
    ours_out = Sampler(ours.model).generate(prompts, SamplingParams(max_new_tokens=24), stop_ids=tokenizer.stop_ids)
    for prompt, continuation in zip(prompts, ours_out, strict=True):
        with torch.no_grad():
            ref = reference.generate(
                torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=list(tokenizer.stop_ids)
            )[0, len(prompt) :].tolist()
        assert continuation == ref, (tokenizer.decode(continuation), tokenizer.decode(ref))
    assert all(len(c) > 0 for c in ours_out)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gemstill", *args], capture_output=True, text=True, timeout=600, env=os.environ.copy()
    )


def test_cli_score_json_matches_transformers(reference):
    """`gemstill score --json` through the gemma3-270m alias (assembled from the PyPI package)."""
    text = "The quick brown fox jumps over the lazy dog.\n\tIndented line with   spaces and 12345 digits."
    result = _cli("score", "--model", "gemma3-270m", "--text", text, "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    ids = payload["token_ids"]
    assert ids[0] == 2 and len(payload["logprobs"]) == len(ids) - 1
    assert np.abs(np.array(payload["logprobs"]) - _reference_logprobs(reference, ids)).max() < TOL
    assert payload["perplexity"] == pytest.approx(float(np.exp(-np.mean(payload["logprobs"]))), rel=1e-6)


def test_cli_generate_json_and_streaming():
    """Two processes with one seed: the streamed text is the JSON's, so streaming prints what generation chose and
    a seeded sample repeats across processes."""
    args = ("generate", "--model", "gemma3-270m", "--chat", "--prompt", "Name a primary color.")
    sampling = ("--max-new-tokens", "12", "--temperature", "0.9", "--top-p", "0.9", "--seed", "3")
    result = _cli(*args, *sampling, "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert 0 < len(payload["token_ids"]) <= 12 and payload["text"].strip()
    streamed = _cli(*args, *sampling)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.strip() == payload["text"].strip()


def test_cli_info():
    result = _cli("info", "--model", "gemma3-270m", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["params"]["total"] == 268_098_176
    assert payload["config"]["sliding_window"] == 512


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("score", "--model", "gguf:/no/such/file.gguf", "--text", "hi"), "file not found"),
        (("score", "--model", "ftp:somewhere", "--text", "hi"), "not understood"),
        (("score", "--model", "gemma3-270m", "--text-file", "/no/such/text.txt"), "file not found"),
        (("score", "--model", "gemma3-270m"), "exactly one of --text or --text-file"),
        (
            ("generate", "--model", "gemma3-270m", "--prompt", "hi", "--max-new-tokens", "40000"),
            "exceeds the model's context",
        ),
    ],
)
def test_cli_bad_input_is_one_line(args, message):
    result = _cli(*args)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
