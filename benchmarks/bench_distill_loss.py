"""The chunked custom-VJP distillation loss vs the naive one, at Gemma 3's vocabulary (262,144), side by side.

Naive: full [tokens x vocab] float32 logits, log_softmax and gathers, differentiated by JAX. Chunked:
gemstill.kernels.chunked_head.head_stats (one [chunk x vocab] tile live at a time, recomputed in the backward pass) with
the same sparse forward-KL + cross-entropy loss on top. Printed per configuration:
  - compiled temporary memory of forward+backward (XLA memory analysis; deterministic, works on CPU), and
  - training-loss throughput, tokens/s of forward+backward (median of --repeats timed calls after a warm-up),
and the ratios chunked / naive. Both losses are checked to agree before anything is timed.

    python benchmarks/bench_distill_loss.py [--tokens 1024 4096 8192] [--dim 640] [--k 64] [--chunk 1024]
        [--time-tokens 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from gemstill.kernels.chunked_head import head_stats, head_stats_reference

from gemstill.distill.losses import TeacherTargets, logit_loss
from gemstill.memory import human

VOCAB = 262_144


def make_loss(stats_fn):
    def loss(hidden, table, ids, logprobs, tail, labels):
        stats = stats_fn(hidden, table, ids, labels)
        terms = logit_loss(
            stats,
            TeacherTargets(ids, logprobs, tail),
            kind="forward_kl",
            tail="bucket",
            alpha=0.5,
            beta=0.5,
            temperature=1.0,
            cache_temperature=1.0,
        )
        return terms.total.mean()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def inputs(tokens: int, dim: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    logprobs = np.log(rng.dirichlet(np.ones(k + 1), size=tokens)[:, :k]).astype(np.float32)
    return (
        jnp.asarray(rng.normal(size=(tokens, dim)), jnp.float32),
        jnp.asarray(rng.normal(size=(VOCAB, dim)) * dim**-0.5, jnp.float32),
        jnp.asarray(np.sort(rng.choice(VOCAB, size=(tokens, k)), axis=-1), jnp.int32),
        jnp.asarray(logprobs),
        jnp.asarray(1 - np.exp(logprobs).sum(-1), jnp.float32),
        jnp.asarray(rng.integers(0, VOCAB, tokens), jnp.int32),
    )


def shapes(tokens: int, dim: int, k: int):
    f32, i32 = jnp.float32, jnp.int32
    return (
        jax.ShapeDtypeStruct((tokens, dim), f32),
        jax.ShapeDtypeStruct((VOCAB, dim), f32),
        jax.ShapeDtypeStruct((tokens, k), i32),
        jax.ShapeDtypeStruct((tokens, k), f32),
        jax.ShapeDtypeStruct((tokens,), f32),
        jax.ShapeDtypeStruct((tokens,), i32),
    )


def temp_bytes(fn, args) -> int:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--time-tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    naive = make_loss(head_stats_reference)
    chunked = make_loss(lambda *a: head_stats(*a, chunk=args.chunk))
    print(f"vocab {VOCAB:,}, width {args.dim}, k {args.k}, chunk {args.chunk}, backend {jax.default_backend()}")
    print(f"{'tokens':>7} {'naive temp':>12} {'chunked temp':>13} {'chunked/naive':>14}")
    for tokens in args.tokens:
        spec = shapes(tokens, args.dim, args.k)
        n, c = temp_bytes(naive, spec), temp_bytes(chunked, spec)
        print(f"{tokens:>7} {human(n):>12} {human(c):>13} {c / n:>14.4f}")

    data = inputs(args.time_tokens, args.dim, args.k)
    (v_naive, g_naive), (v_chunked, g_chunked) = naive(*data), chunked(*data)
    np.testing.assert_allclose(v_chunked, v_naive, rtol=1e-5)
    for got, want in zip(g_chunked, g_naive, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)
    t_naive, t_chunked = seconds(naive, data, args.repeats), seconds(chunked, data, args.repeats)
    rate_naive, rate_chunked = args.time_tokens / t_naive, args.time_tokens / t_chunked
    print(
        f"fwd+bwd at {args.time_tokens} tokens: naive {rate_naive:.0f} tok/s, chunked {rate_chunked:.0f} tok/s, "
        f"chunked/naive speed {rate_chunked / rate_naive:.2f}x (values agree to 1e-5, gradients to 1e-3)"
    )


if __name__ == "__main__":
    main()
