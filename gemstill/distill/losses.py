"""Distillation losses on the student's HeadStats and the teacher's sparse (cached) distribution.

The teacher is known on k kept ids plus the probability of everything else (the tail). Two readings:

- `bucket`: the distribution over the k ids and one extra outcome, "any other id", on both sides: the teacher's
  tail mass and the student's (1 - its mass on the kept ids). Nothing is thrown away; the divergence is that of
  two distributions over k + 1 outcomes, a lower bound of the full-vocabulary one.
- `renormalize`: both distributions restricted to the k ids and renormalized (what most sparse-KD code does).

At a loss temperature T other than the cache's Tc the teacher is re-tempered from its cached log-probs: the kept
logits are Tc * logprobs (up to a shared constant) and the tail counts as one pooled logit Tc * log(tail). That
is exact at T = Tc and an approximation elsewhere (the tail's inner spread is unknown). Per-token divergences are
multiplied by T^2 (Hinton et al.) so gradient scales stay comparable across temperatures.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from gemstill.kernels.chunked_head import HeadStats

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
TailMode = Literal["bucket", "renormalize"]

_TINY = 1e-30  # probabilities are floored here before a log: a zero tail mass contributes 0 * log 0 = 0
# a cached tail mass below this is rounding noise of 1 - sum(k float32 probabilities), not mass: re-tempering to
# T > Tc would blow it up (mass m becomes ~m^(Tc/T)), so it counts as zero
_TAIL_NOISE = 1e-6


class TeacherTargets(NamedTuple):
    """The teacher per token (flattened [N]): its kept ids and log-probs at the cache temperature, its tail mass."""

    ids: jax.Array  # [N, k] int32
    logprobs: jax.Array  # [N, k] float32, log p at the cache temperature
    tail_mass: jax.Array  # [N] float32


def teacher_logprobs(targets: TeacherTargets, temperature: jax.Array, cache_temperature: float, tail: TailMode):
    """The teacher's log-probs over the outcomes of `tail` mode at `temperature`: [N, k + 1] or [N, k]."""
    scale = cache_temperature / temperature
    kept = targets.logprobs * scale
    if tail == "renormalize":
        return jax.nn.log_softmax(kept, axis=-1)
    tail_mass = jnp.where(targets.tail_mass > _TAIL_NOISE, targets.tail_mass, 0.0)
    pooled = jnp.log(jnp.maximum(tail_mass, _TINY))[:, None] * scale
    return jax.nn.log_softmax(jnp.concatenate([kept, pooled], axis=-1), axis=-1)


def student_logprobs(stats: HeadStats, temperature: jax.Array, tail: TailMode) -> jax.Array:
    """The student's log-probs over the same outcomes as `teacher_logprobs`, from its HeadStats."""
    scaled = stats.kept / temperature
    if tail == "renormalize":
        return jax.nn.log_softmax(scaled, axis=-1)
    kept = scaled - stats.lse_t[:, None]
    # kept ids may repeat (sampled caches never do; a hand-made target might): their mass counts once per entry
    rest = 1.0 - jnp.exp(kept).sum(axis=-1)
    pooled = jnp.log(jnp.maximum(rest, _TINY))
    return jnp.concatenate([kept, pooled[:, None]], axis=-1)


def kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p || q) over the last axis; outcomes with p = 0 contribute nothing."""
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def generalized_jsd(log_p: jax.Array, log_q: jax.Array, beta: jax.Array) -> jax.Array:
    """beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta p + (1 - beta) q (Agarwal et al., GKD); 0 < beta < 1."""
    log_m = jnp.logaddexp(jnp.log(beta) + log_p, jnp.log1p(-beta) + log_q)
    return beta * kl(log_p, log_m) + (1.0 - beta) * kl(log_q, log_m)


def divergence(log_teacher: jax.Array, log_student: jax.Array, kind: Divergence, beta: jax.Array) -> jax.Array:
    """Per-token divergence: forward KL(teacher || student), reverse KL(student || teacher), or generalized JSD."""
    if kind == "forward_kl":
        return kl(log_teacher, log_student)
    if kind == "reverse_kl":
        return kl(log_student, log_teacher)
    return generalized_jsd(log_teacher, log_student, beta)


def cross_entropy(stats: HeadStats) -> jax.Array:
    """Per-token hard-label NLL at temperature 1."""
    return stats.lse - stats.label


class LogitLossTerms(NamedTuple):
    """Per-token terms [N] of the logit loss; `total` = alpha * T^2 * divergence + (1 - alpha) * cross_entropy."""

    total: jax.Array
    distill: jax.Array  # T^2 * divergence
    cross_entropy: jax.Array


def logit_loss(
    stats: HeadStats,
    targets: TeacherTargets,
    *,
    kind: Divergence,
    tail: TailMode,
    alpha: jax.Array,
    beta: jax.Array,
    temperature: jax.Array,
    cache_temperature: float,
) -> LogitLossTerms:
    """The per-token distillation loss; alpha = 0 is plain cross-entropy (the baseline student)."""
    log_t = teacher_logprobs(targets, temperature, cache_temperature, tail)
    log_s = student_logprobs(stats, temperature, tail)
    distill = jnp.square(temperature) * divergence(log_t, log_s, kind, beta)
    ce = cross_entropy(stats)
    return LogitLossTerms(alpha * distill + (1.0 - alpha) * ce, distill, ce)


def masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean of values over entries whose weight is nonzero (weights broadcast against values' leading axes)."""
    weights = weights.astype(jnp.float32)
    return (values * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def _rms_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)


def hidden_loss(
    student: jax.Array,
    teacher: jax.Array,
    projection: jax.Array | None,
    mask: jax.Array,
    kind: Literal["mse", "cosine"],
) -> jax.Array:
    """Hidden-state matching on one mapped layer pair: student [B, L, Ds] projected to the teacher's width by
    projection [Ds, Dt] (None when widths agree), both RMS-normalized (residual streams grow with depth, so raw
    scales are not comparable), then MSE or 1 - cosine, averaged over the masked tokens."""
    if projection is not None:
        student = student.astype(jnp.float32) @ projection.astype(jnp.float32)
    s, t = _rms_normalize(student), _rms_normalize(jax.lax.stop_gradient(teacher))
    if kind == "mse":
        per_token = jnp.mean(jnp.square(s - t), axis=-1)
    else:
        per_token = 1.0 - jnp.sum(s * t, axis=-1) / (jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1) + 1e-6)
    return masked_mean(per_token, mask)


def attention_loss(student: jax.Array, teacher: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention-map similarity on one mapped layer pair: KL(teacher || student) between the head-averaged
    attention distributions over keys ([B, heads, T, S], head counts may differ), averaged over masked queries."""
    p = jax.lax.stop_gradient(teacher).astype(jnp.float32).mean(axis=1)
    q = student.astype(jnp.float32).mean(axis=1)
    per_query = jnp.sum(
        jnp.where(p > 0, p * (jnp.log(jnp.maximum(p, _TINY)) - jnp.log(jnp.maximum(q, _TINY))), 0.0), -1
    )
    return masked_mean(per_query, mask)
