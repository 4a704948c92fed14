"""Distillation losses against plain numpy references, and the chunked custom-VJP LM head against full logits.

Tolerances: float32 everywhere; values and gradients agree to 1e-5 relative (2e-5 absolute) unless stated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gemstill.kernels.chunked_head import head_stats, head_stats_reference
from hypothesis import given, settings
from hypothesis import strategies as st

from gemstill.distill.config import Schedule, schedule_value
from gemstill.distill.losses import TeacherTargets, attention_loss, hidden_loss, logit_loss
from gemstill.teacher_cache.compute import summarize


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(q)), 0.0), axis=-1)


def _np_divergence(p: np.ndarray, q: np.ndarray, kind: str, beta: float) -> np.ndarray:
    if kind == "forward_kl":
        return _np_kl(p, q)
    if kind == "reverse_kl":
        return _np_kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _np_kl(p, m) + (1 - beta) * _np_kl(q, m)


def _problem(n: int, d: int, vocab: int, k: int, seed: int, t_cache: float = 1.0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(n, d)).astype(np.float32)
    table = (rng.normal(size=(vocab, d)) * 0.4).astype(np.float32)
    teacher_logits = (rng.normal(size=(n, vocab)) * 2.0).astype(np.float32)
    summary = summarize(jnp.asarray(teacher_logits), k, t_cache)
    targets = TeacherTargets(summary.ids, summary.logprobs, summary.tail_mass)
    labels = rng.integers(0, vocab, n).astype(np.int32)
    return hidden, table, teacher_logits, targets, labels


def _np_sparse_reference(student_logits, targets, kind, tail, beta, temperature, t_cache):
    """The sparse loss written directly on explicit distributions (numpy, float64)."""
    z = student_logits.astype(np.float64)
    q_full = np.exp(_np_log_softmax(z / temperature))
    ids = np.asarray(targets.ids)
    q_kept = np.take_along_axis(q_full, ids, axis=-1)
    kept_logits = np.asarray(targets.logprobs, np.float64) * t_cache / temperature
    tail_mass = np.asarray(targets.tail_mass, np.float64)
    tail_logit = np.log(np.where(tail_mass > 1e-6, tail_mass, 1e-30)) * t_cache / temperature
    if tail == "bucket":
        p = np.exp(_np_log_softmax(np.concatenate([kept_logits, tail_logit[:, None]], axis=-1)))
        q = np.concatenate([q_kept, 1 - q_kept.sum(-1, keepdims=True)], axis=-1)
    else:
        p = np.exp(_np_log_softmax(kept_logits))
        q = q_kept / q_kept.sum(-1, keepdims=True)
    return temperature**2 * _np_divergence(p, np.maximum(q, 1e-30), kind, beta)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_logit_loss_matches_numpy(kind, tail, temperature):
    hidden, table, _, targets, labels = _problem(24, 8, 96, 12, seed=1)
    stats = head_stats(
        jnp.asarray(hidden), jnp.asarray(table), targets.ids, jnp.asarray(labels), temperature=temperature
    )
    terms = logit_loss(
        stats, targets, kind=kind, tail=tail, alpha=0.3, beta=0.4, temperature=temperature, cache_temperature=1.0
    )
    z = hidden.astype(np.float64) @ table.T.astype(np.float64)
    expected = _np_sparse_reference(z, targets, kind, tail, 0.4, temperature, 1.0)
    ce = -np.take_along_axis(_np_log_softmax(z), labels[:, None], axis=-1)[:, 0]
    np.testing.assert_allclose(terms.distill, expected, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(terms.cross_entropy, ce, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(terms.total, 0.3 * expected + 0.7 * ce, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 3.0])
def test_full_vocabulary_kept_equals_the_exact_divergence(kind, temperature):
    """With k = vocab nothing is in the tail: the sparse loss is the full-vocabulary divergence at any T, and the
    re-tempered teacher (cached at T=1) is exactly softmax(teacher_logits / T)."""
    vocab = 40
    hidden, table, teacher_logits, targets, labels = _problem(16, 8, vocab, vocab, seed=2)
    stats = head_stats_reference(
        jnp.asarray(hidden), jnp.asarray(table), targets.ids, jnp.asarray(labels), temperature=temperature
    )
    for tail in ("bucket", "renormalize"):
        terms = logit_loss(
            stats, targets, kind=kind, tail=tail, alpha=1.0, beta=0.3, temperature=temperature, cache_temperature=1.0
        )
        p = np.exp(_np_log_softmax(teacher_logits.astype(np.float64) / temperature))
        q = np.exp(_np_log_softmax((hidden.astype(np.float64) @ table.T) / temperature))
        expected = temperature**2 * _np_divergence(p, q, kind, 0.3)
        np.testing.assert_allclose(terms.distill, expected, rtol=1e-3, atol=1e-5)


def test_cached_temperature_reproduces_the_tempered_teacher():
    """Cache at Tc = 2, distill at T = 2: the teacher side is the cached distribution itself (bucket sums to 1)."""
    hidden, table, teacher_logits, targets, labels = _problem(8, 8, 64, 64, seed=3, t_cache=2.0)
    stats = head_stats_reference(
        jnp.asarray(hidden), jnp.asarray(table), targets.ids, jnp.asarray(labels), temperature=2.0
    )
    terms = logit_loss(
        stats, targets, kind="forward_kl", tail="bucket", alpha=1.0, beta=0.5, temperature=2.0, cache_temperature=2.0
    )
    p = np.exp(_np_log_softmax(teacher_logits.astype(np.float64) / 2.0))
    q = np.exp(_np_log_softmax((hidden.astype(np.float64) @ table.T) / 2.0))
    np.testing.assert_allclose(terms.distill, 4.0 * _np_kl(p, q), rtol=1e-3, atol=1e-5)


def _naive_head_loss(hidden, table, targets, labels, weights, temperature, softcap, kind, tail):
    """The naive path: full [N, V] logits, log_softmax, gather (what the chunked loss must equal)."""
    stats = head_stats_reference(hidden, table, targets.ids, labels, temperature=temperature, softcap=softcap)
    terms = logit_loss(
        stats, targets, kind=kind, tail=tail, alpha=0.6, beta=0.5, temperature=temperature, cache_temperature=1.0
    )
    return (terms.total * weights).sum() / weights.sum()


@settings(max_examples=6, deadline=None)  # each example compiles both heads twice; six cover the choices
@given(
    n=st.integers(1, 40),
    chunk=st.sampled_from([8, 16, 64]),
    k=st.integers(1, 10),
    softcap=st.sampled_from([None, 4.0]),
    kind=st.sampled_from(["forward_kl", "reverse_kl", "jsd"]),
    tail=st.sampled_from(["bucket", "renormalize"]),
    temperature=st.sampled_from([1.0, 2.0]),
    seed=st.integers(0, 1000),
)
def test_chunked_head_equals_naive_values_and_gradients(n, chunk, k, softcap, kind, tail, temperature, seed):
    hidden, table, _, targets, labels = _problem(n, 12, 70, k, seed=seed)
    hidden, table, labels = jnp.asarray(hidden), jnp.asarray(table), jnp.asarray(labels)
    weights = jnp.asarray(np.random.default_rng(seed).integers(0, 2, n).astype(np.float32)).at[0].set(1.0)

    def chunked(h, e):
        stats = head_stats(h, e, targets.ids, labels, temperature=temperature, softcap=softcap, chunk=chunk)
        terms = logit_loss(
            stats, targets, kind=kind, tail=tail, alpha=0.6, beta=0.5, temperature=temperature, cache_temperature=1.0
        )
        return (terms.total * weights).sum() / weights.sum()

    def naive(h, e):
        return _naive_head_loss(h, e, targets, labels, weights, temperature, softcap, kind, tail)

    value, grads = jax.value_and_grad(chunked, argnums=(0, 1))(hidden, table)
    ref_value, ref_grads = jax.value_and_grad(naive, argnums=(0, 1))(hidden, table)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=2e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_chunked_head_bfloat16_inputs_keep_dtypes():
    hidden, table, _, targets, labels = _problem(20, 16, 64, 4, seed=5)
    h16, e16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(table, jnp.bfloat16)

    def loss(fn, h, e):
        s = fn(h, e, targets.ids, jnp.asarray(labels), temperature=1.0)
        return (s.lse - s.label).sum() + s.kept.sum() * 0.1

    grads = jax.grad(lambda h, e: loss(lambda *a, **kw: head_stats(*a, chunk=8, **kw), h, e), argnums=(0, 1))(h16, e16)
    ref = jax.grad(lambda h, e: loss(head_stats_reference, h, e), argnums=(0, 1))(
        h16.astype(jnp.float32), e16.astype(jnp.float32)
    )
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    for got, want in zip(grads, ref, strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)  # bfloat16 output rounding


def test_chunked_head_never_holds_all_logits():
    """Compiled temporary memory of forward+backward stays near one [chunk x vocab] tile, far below [N x vocab]."""
    n, d, vocab, chunk = 2048, 64, 32768, 128
    hidden = jax.ShapeDtypeStruct((n, d), jnp.float32)
    table = jax.ShapeDtypeStruct((vocab, d), jnp.float32)
    ids = jax.ShapeDtypeStruct((n, 8), jnp.int32)
    labels = jax.ShapeDtypeStruct((n,), jnp.int32)

    def grad_of(fn):
        def loss(h, e, i, y):
            s = fn(h, e, i, y)
            return (s.lse - s.label).sum() + s.kept.sum()

        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, table, ids, labels).compile().memory_analysis()

    chunked = grad_of(lambda *a: head_stats(*a, chunk=chunk)).temp_size_in_bytes
    naive = grad_of(head_stats_reference).temp_size_in_bytes
    logits_bytes = n * vocab * 4
    assert naive >= logits_bytes
    assert chunked < naive / 8, (chunked, naive)


def test_alpha_zero_is_plain_cross_entropy_and_ignores_the_teacher():
    hidden, table, _, targets, labels = _problem(10, 8, 50, 5, seed=6)
    stats = head_stats(jnp.asarray(hidden), jnp.asarray(table), targets.ids, jnp.asarray(labels))
    terms = logit_loss(
        stats, targets, kind="forward_kl", tail="bucket", alpha=0.0, beta=0.5, temperature=1.0, cache_temperature=1.0
    )
    np.testing.assert_allclose(terms.total, terms.cross_entropy, rtol=0, atol=0)


def test_hidden_and_attention_losses_match_numpy():
    rng = np.random.default_rng(7)
    student = rng.normal(size=(2, 5, 6)).astype(np.float32) * 3
    teacher = rng.normal(size=(2, 5, 8)).astype(np.float32) * 10
    projection = rng.normal(size=(6, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)

    def rms(x):
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)

    s, t = rms(student.astype(np.float64) @ projection), rms(teacher.astype(np.float64))
    mse = ((s - t) ** 2).mean(-1)[mask].mean()
    cos = (1 - (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1)))[mask].mean()
    np.testing.assert_allclose(hidden_loss(student, teacher, projection, mask, "mse"), mse, rtol=1e-5)
    np.testing.assert_allclose(hidden_loss(student, teacher, projection, mask, "cosine"), cos, rtol=1e-4, atol=1e-6)

    def probs(heads):
        return np.exp(_np_log_softmax(rng.normal(size=(2, heads, 5, 5))))

    ps, pt = probs(2), probs(4)
    p, q = pt.mean(1), ps.mean(1)
    expected = (p * (np.log(p) - np.log(q))).sum(-1)[mask].mean()
    np.testing.assert_allclose(attention_loss(ps, pt, mask), expected, rtol=1e-5)


def test_schedules():
    linear = Schedule(start=1.0, end=0.0)
    cosine = Schedule(start=0.0, end=2.0, shape="cosine")
    assert schedule_value(0.5, 3, 10) == 0.5
    assert [schedule_value(linear, s, 5) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    np.testing.assert_allclose([schedule_value(cosine, s, 3) for s in range(3)], [0.0, 1.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(schedule_value(cosine, jnp.asarray(1), 3), 1.0, atol=1e-6)  # traced steps work
