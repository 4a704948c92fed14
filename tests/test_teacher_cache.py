"""The teacher logit cache: compute vs a numpy reference, exact round trips, resume after damage and after SIGKILL."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import sentencepiece as spm
from conftest import TINY
from flax import nnx

from gemstill.data.format import read_split, write_split
from gemstill.data.targets import prediction_mask
from gemstill.errors import GemstillError
from gemstill.loading import LoadedModel
from gemstill.model import build_model
from gemstill.teacher_cache.catalog import CATALOG
from gemstill.teacher_cache.compute import (
    gumbel_noise,
    summarize,
    summarize_hidden,
    teacher_summary,
    token_keys,
    top_k_ids,
)
from gemstill.teacher_cache.config import TeacherCacheConfig
from gemstill.teacher_cache.reader import TeacherCacheReader
from gemstill.teacher_cache.stats import cache_stats
from gemstill.teacher_cache.writer import build_teacher_cache
from gemstill.tokenizer import Tokenizer

TEACHER = TINY.replace(num_layers=2)  # two local layers: a real model, quick to compile
SEQ_LEN = 32
CONFIG = TeacherCacheConfig(k=16, sequences_per_shard=8, batch_size=4)  # train: 5 shards, the last one short
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "to", "big", "red", "over", "model", "teacher"]


def train_tokenizer(vocab_size: int) -> bytes:
    """A tiny Gemma-style SentencePiece model (special ids and turn markers as Gemma 3 has them)."""
    rng = np.random.default_rng(vocab_size)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(4, 14))) for _ in range(400)]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=proto,
        model_type="bpe",
        vocab_size=vocab_size,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        byte_fallback=True,
        minloglevel=2,
    )
    return proto.getvalue()


def packed_split(tokenizer: Tokenizer, rows: int, seed: int) -> dict[str, np.ndarray]:
    """Rows of whole documents packed end to end (positions restart, segments count up), padded at the end."""
    rng = np.random.default_rng(seed)
    arrays = {name: np.zeros((rows, SEQ_LEN), np.int32) for name in ("tokens", "positions", "segment_ids", "loss_mask")}
    for row in range(rows):
        at, segment = 0, 1
        while at < SEQ_LEN - 4:
            doc = tokenizer.encode(" ".join(rng.choice(WORDS, size=rng.integers(2, 9))))[: SEQ_LEN - at]
            span = slice(at, at + len(doc))
            arrays["tokens"][row, span] = doc
            arrays["positions"][row, span] = np.arange(len(doc))
            arrays["segment_ids"][row, span] = segment
            arrays["loss_mask"][row, at + 1 : at + len(doc)] = 1
            at, segment = at + len(doc), segment + 1
    return arrays


@pytest.fixture(scope="module")
def tokenizer_proto() -> bytes:
    return train_tokenizer(300)


@pytest.fixture(scope="module")
def teacher(tokenizer_proto: bytes) -> LoadedModel:
    return LoadedModel("test", TEACHER, build_model(TEACHER, seed=0), Tokenizer(tokenizer_proto))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_proto: bytes) -> Path:
    directory = tmp_path_factory.mktemp("data")
    (directory / "tokenizer.model").write_bytes(tokenizer_proto)
    for split, rows, seed in (("train", 36, 1), ("validation", 10, 2)):
        write_split(directory, split, **packed_split(Tokenizer(tokenizer_proto), rows, seed))
    return directory


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, teacher: LoadedModel) -> tuple[Path, dict]:
    """An uninterrupted build: what every resumed build must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("reference")
    return out, build_teacher_cache(CONFIG, data_dir, teacher, out, log=lambda _: None)


def shard_digests(out_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((out_dir / "shards").rglob("*"))
        if p.is_file()
    }


def numpy_reference(logits: np.ndarray, k: int, temperature: float) -> dict[str, np.ndarray]:
    z = logits.astype(np.float64) / temperature
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    logp = z - lse[:, None]
    ids = np.sort(np.argsort(-logp, axis=-1)[:, :k], axis=-1)
    kept = np.take_along_axis(logp, ids, -1)
    return {
        "ids": ids,
        "logprobs": kept,
        "lse": lse,
        "entropy": -(np.exp(logp) * logp).sum(-1),
        "tail_mass": 1 - np.exp(kept).sum(-1),
    }


@pytest.mark.parametrize(("temperature", "k"), [(1.0, 8), (0.5, 8), (2.0, 50)])
def test_summary_matches_numpy(temperature: float, k: int) -> None:
    logits = np.random.default_rng(0).normal(size=(37, 3000)).astype(np.float32) * 4  # 47 blocks of 64 ids
    want = numpy_reference(logits, k, temperature)
    direct = summarize(jnp.asarray(logits), k, temperature)
    chunked = summarize_hidden(lambda h: h, jnp.asarray(logits), k, temperature, chunk=16)  # 37 = 2 x 16 + 5
    for got in (direct, chunked):
        np.testing.assert_array_equal(got.ids, want["ids"])
        for name in ("logprobs", "lse", "entropy", "tail_mass"):
            np.testing.assert_allclose(getattr(got, name), want[name], rtol=2e-5, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("vocab", [4096, 5000])  # 5000: the last block of ids is partial
def test_blocked_top_k_is_exact(vocab: int) -> None:
    scores = np.random.default_rng(vocab).normal(size=(9, vocab)).astype(np.float32)
    scores[0, :] = 0.0  # a row of ties: the lowest ids win, as with lax.top_k
    got = np.sort(np.asarray(top_k_ids(jnp.asarray(scores), 16)), axis=-1)
    np.testing.assert_array_equal(got[1:], np.sort(np.argsort(-scores[1:], axis=-1)[:, :16], axis=-1))
    np.testing.assert_array_equal(got[0], np.arange(16))


def test_sampled_ids_are_distinct_and_follow_the_teacher_distribution() -> None:
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03], np.float32))
    draws = 4000
    keys = jax.random.split(jax.random.key(1), draws)
    tiled = np.tile(logits, (draws, 1))
    for temperature in (1.0, 2.0):
        first = np.asarray(summarize(jnp.asarray(tiled), 1, temperature, keys).ids[:, 0])
        probs = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
        np.testing.assert_allclose(np.bincount(first, minlength=5) / draws, probs, atol=0.03)
    three = summarize(jnp.asarray(tiled), 3, 1.0, keys)
    assert all(len(set(row)) == 3 for row in np.asarray(three.ids).tolist())
    np.testing.assert_allclose(three.logprobs, np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03]))[three.ids], rtol=1e-5)


def test_gumbel_noise_is_standard_gumbel_and_independent_across_tokens() -> None:
    noise = np.asarray(
        gumbel_noise(jax.random.split(jax.random.key(0), 4), jnp.arange(1 << 16, dtype=jnp.uint32)), np.float64
    )
    assert np.abs(noise.mean(axis=1) - np.euler_gamma).max() < 0.02  # mean and variance of Gumbel(0, 1)
    assert np.abs(noise.var(axis=1) - np.pi**2 / 6).max() < 0.05
    assert np.abs(np.corrcoef(noise)[np.triu_indices(4, 1)]).max() < 0.02
    assert np.abs(np.corrcoef(noise[0, :-1], noise[0, 1:])[0, 1]) < 0.02


def test_sampled_ids_do_not_depend_on_batching(teacher: LoadedModel, data_dir: Path) -> None:
    data = read_split(data_dir, "train")
    graphdef, state = nnx.split(teacher.model)

    def ids(rows: list[int]) -> np.ndarray:
        args = (jnp.asarray(data[n][rows]) for n in ("tokens", "positions", "segment_ids", "seq_index"))
        out = teacher_summary(graphdef, state, *args, jnp.asarray(7), k=4, temperature=1.0, sampled=True)
        return np.asarray(out.ids)

    np.testing.assert_array_equal(ids([3, 5, 9])[1], ids([5])[0])
    assert not np.array_equal(ids([5])[0], ids([6])[0])
    keys = token_keys(jnp.asarray(0), jnp.asarray([4, 4, 5]), 3)
    assert jax.random.key_data(keys[0]).tolist() == jax.random.key_data(keys[1]).tolist()


def test_reader_returns_the_computed_values_by_seq_index(
    reference: tuple[Path, dict], data_dir: Path, teacher: LoadedModel
) -> None:
    out, metrics = reference
    reader = TeacherCacheReader(out)
    data = read_split(data_dir, "train")
    order = np.random.default_rng(3).permutation(36)[:11]
    got = reader.read("train", order)
    graphdef, state = nnx.split(teacher.model)
    args = (jnp.asarray(data[n][order]) for n in ("tokens", "positions", "segment_ids", "seq_index"))
    want = jax.device_get(teacher_summary(graphdef, state, *args, jnp.asarray(0), k=16, temperature=1.0, sampled=False))
    mask = prediction_mask(data["loss_mask"][order])
    np.testing.assert_array_equal(got["seq_index"], order)
    np.testing.assert_array_equal(got["seq_id"], data["seq_id"][order])
    np.testing.assert_array_equal(got["mask"], mask)
    np.testing.assert_array_equal(got["ids"][mask], want.ids[mask])
    np.testing.assert_array_equal(got["ids"][~mask], 0)
    for name in ("lse", "entropy", "tail_mass"):
        np.testing.assert_allclose(got[name][mask], getattr(want, name)[mask], rtol=1e-5, atol=1e-6, err_msg=name)
    # stored as float16: within half a float16 ulp of the float32 log-prob (relative 2^-11)
    exact = want.logprobs[mask]
    error = np.abs(got["logprobs"][mask] - exact)
    assert (error <= np.abs(exact) * 2.0**-11 + 1e-7).all()
    assert 0 < metrics["value_abs_err_max"] <= np.abs(exact).max() * 2.0**-11
    assert metrics["value_abs_err_mean"] < metrics["value_abs_err_max"]
    # prefetched batches: the same rows, in the requested order, whatever the batch size
    batches = list(reader.batches("train", order, batch_size=4, prefetch=2))
    assert [len(b["seq_index"]) for b in batches] == [4, 4, 3]
    for name, values in got.items():
        np.testing.assert_array_equal(np.concatenate([b[name] for b in batches]), values, err_msg=name)
    assert [int(b["seq_index"][0]) for b in reader.batches("validation", None, batch_size=4)] == [0, 4, 8]
    with pytest.raises(GemstillError, match=r"seq_index 10 \(1 of 2 asked\) is not in the teacher cache"):
        reader.read("validation", [3, 10])
    reader.check_alignment(data_dir)


def test_alignment_check_refuses_other_data(
    reference: tuple[Path, dict], tokenizer_proto: bytes, tmp_path: Path
) -> None:
    for split, rows, seed in (("train", 36, 1), ("validation", 10, 5)):  # validation: other sequences
        write_split(tmp_path, split, **packed_split(Tokenizer(tokenizer_proto), rows, seed))
    with pytest.raises(GemstillError, match=r"does not match the data .* \(validation: seq_index 0\)"):
        TeacherCacheReader(reference[0]).check_alignment(tmp_path)


def test_stats_match_numpy(reference: tuple[Path, dict]) -> None:
    out, metrics = reference
    reader = TeacherCacheReader(out)
    stats = {row["split"]: row for row in cache_stats(out)}
    total_tokens = 0
    for split, rows in (("train", 36), ("validation", 10)):
        everything = reader.read(split, range(rows))
        mask = everything["mask"]
        size = sum(p.stat().st_size for p in (out / "shards" / split).glob("*.parquet"))
        assert stats[split]["sequences"] == rows
        assert stats[split]["tokens"] == mask.sum()
        assert stats[split]["bytes"] == size
        assert stats[split]["bytes_per_token"] == pytest.approx(size / mask.sum())
        assert stats[split]["mean_kept_mass"] == pytest.approx(np.mean(1 - everything["tail_mass"][mask]), rel=1e-6)
        assert stats[split]["mean_entropy"] == pytest.approx(np.mean(everything["entropy"][mask]), rel=1e-6)
        kept = np.exp(everything["logprobs"][mask].astype(np.float64)).sum(-1)
        np.testing.assert_allclose(kept, 1 - everything["tail_mass"][mask], atol=2e-3)
        total_tokens += mask.sum()
    assert metrics["tokens"] == total_tokens and metrics["sequences"] == 46 and metrics["shards"] == 7


def test_resume_rewrites_only_damaged_shards(
    reference: tuple[Path, dict], data_dir: Path, teacher: LoadedModel, tmp_path: Path
) -> None:
    out = tmp_path / "cache"
    shutil.copytree(reference[0], out)
    with duckdb.connect(str(out / CATALOG)) as con:
        paths = [p for (p,) in con.execute("SELECT path FROM shards ORDER BY split, seq_start").fetchall()]
        con.execute("DELETE FROM shards WHERE path IN (?, ?)", paths[-2:])  # the files stay: uncatalogued
    truncated, corrupted = out / paths[0], out / paths[2]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    damaged = bytearray(corrupted.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    corrupted.write_bytes(bytes(damaged))
    with pytest.raises(GemstillError, match=r"corrupt.*re-run the teacher_cache stage"):
        TeacherCacheReader(out).read("train", [16])
    logs: list[str] = []
    metrics = build_teacher_cache(CONFIG, data_dir, teacher, out, log=logs.append)
    assert metrics["computed_shards"] == 4
    for problem in ("truncated", "sha256 mismatch", "not in the catalog"):
        assert any(problem in line for line in logs), problem
    assert shard_digests(out) == shard_digests(reference[0])
    again = build_teacher_cache(CONFIG, data_dir, teacher, out, log=lambda _: None)
    assert again["computed_shards"] == 0 and again["tokens"] == reference[1]["tokens"]


_CHILD = """
import sys, time
from pathlib import Path
from gemstill.loading import LoadedModel
from gemstill.model import build_model
from gemstill.teacher_cache.writer import build_teacher_cache
from gemstill.tokenizer import Tokenizer
from test_teacher_cache import CONFIG, TEACHER

data, out = Path(sys.argv[1]), Path(sys.argv[2])
teacher = LoadedModel("test", TEACHER, build_model(TEACHER, seed=0), Tokenizer.from_file(data / "tokenizer.model"))
build_teacher_cache(CONFIG, data, teacher, out, log=lambda line: time.sleep(0.2))  # slow: room to be killed
"""


def test_sigkill_then_resume_gives_the_same_bytes(
    reference: tuple[Path, dict], data_dir: Path, teacher: LoadedModel, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_CHILD), str(data_dir), str(out)], env=env)
    deadline = time.monotonic() + 60
    committed = 0
    while committed == 0 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            with duckdb.connect(str(out / CATALOG), read_only=True) as con:
                committed = con.execute("SELECT count(*) FROM shards").fetchone()[0]
        except duckdb.Error:  # not created yet, or the child holds it for a moment
            continue
    time.sleep(np.random.default_rng().uniform(0, 0.4))  # anywhere in the next shard's compute, write or commit
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "the child finished before it could be killed"
    assert committed >= 1
    metrics = build_teacher_cache(CONFIG, data_dir, teacher, out, log=lambda _: None)
    assert 0 < metrics["computed_shards"] < 7
    assert shard_digests(out) == shard_digests(reference[0])


def test_sampled_bfloat16_cache_round_trips(data_dir: Path, teacher: LoadedModel, tmp_path: Path) -> None:
    config = CONFIG.model_copy(update={"mode": "sampled", "values": "bfloat16", "splits": ["validation"], "seed": 3})
    metrics = build_teacher_cache(config, data_dir, teacher, tmp_path, log=lambda _: None)
    got = TeacherCacheReader(tmp_path).read("validation", [9, 0])
    mask = got["mask"]
    ids = got["ids"][mask]
    assert (np.diff(ids, axis=-1) > 0).all()  # distinct (and ascending)
    assert 0 < metrics["value_abs_err_max"] <= 50 * 2.0**-8  # bfloat16: 8 significant bits, |log-prob| < 50
    assert (
        got["logprobs"][mask].astype(ml_dtypes.bfloat16).astype(np.float32).tolist() == got["logprobs"][mask].tolist()
    )
    with pytest.raises(GemstillError, match=r"mode='sampled' \(now 'topk'\)"):
        build_teacher_cache(CONFIG, data_dir, teacher, tmp_path, log=lambda _: None)


def test_teachers_that_do_not_fit_the_data_are_refused_before_compute(
    data_dir: Path, teacher: LoadedModel, tmp_path: Path
) -> None:
    other = LoadedModel("other", TEACHER, teacher.model, Tokenizer(train_tokenizer(290)))
    with pytest.raises(GemstillError, match="different tokenizer"):
        build_teacher_cache(CONFIG, data_dir, other, tmp_path, log=lambda _: None)
    with pytest.raises(GemstillError, match="carries no tokenizer"):
        build_teacher_cache(CONFIG, data_dir, LoadedModel("bare", TEACHER, teacher.model, None), tmp_path)
    small = TEACHER.replace(vocab_size=256)
    narrow = LoadedModel("narrow", small, build_model(small), teacher.tokenizer)
    with pytest.raises(GemstillError, match="vocab_size 256, smaller than the data tokenizer's 300"):
        build_teacher_cache(CONFIG, data_dir, narrow, tmp_path, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []
