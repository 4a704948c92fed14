"""gemstill.kernels against plain XLA, side by side in one run: memory everywhere, speed on an accelerator.

Memory (any backend, from XLA's compiled memory analysis, deterministic): peak temporary bytes of one
value-and-grad of a distillation loss (sparse KL over 64 kept ids at T=2 + hard-label CE) over an LM head of
--vocab rows x --dim, --tokens tokens, float32:
  naive      logits [N x V] + log_softmax (at 1 and T) + gather, differentiated by JAX
  chunked    gemstill.kernels.chunked_head.head_stats (XLA, --chunk tokens per tile, custom VJP)
  fused      gemstill.kernels.lm_head with its three Pallas kernels as opaque calls (what XLA holds around them;
             a kernel's own working set is VMEM tiles, listed separately)
  fused-interp  the same lowered with the kernels in Pallas' CPU interpreter (adds the interpreter's copies of
             hidden and table: an upper bound, not what a TPU allocates)
Speed (only when jax.default_backend() != "cpu"): fused loss vs naive, sliding-window vs global attention at
--tokens, attention fwd+bwd vs jax.nn.dot_product_attention, int8 weight matmul vs bf16.

    python benchmarks/kernels.py [--tokens 8192] [--vocab 262144] [--dim 640] [--chunk 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from gemstill.kernels import lm_head
from gemstill.kernels.chunked_head import HeadStats, head_stats
from gemstill.kernels.dispatch import attention, head_stats_dispatch, quant_matmul
from gemstill.kernels.quant_matmul import quantize_int8

KEPT = 64
TEMPERATURE = 2.0


def loss_from_stats(stats: HeadStats, weights: jax.Array) -> jax.Array:
    """Sparse KL's student part (teacher weights x log q_T at kept ids) + CE, from HeadStats."""
    return -jnp.sum(weights * (stats.kept / TEMPERATURE - stats.lse_t[:, None])) - jnp.sum(stats.label - stats.lse)


def naive_loss(hidden, table, ids, labels, weights) -> jax.Array:
    z = jnp.einsum("nd,vd->nv", hidden, table, preferred_element_type=jnp.float32)
    log_q_t = jax.nn.log_softmax(z / TEMPERATURE)
    log_q = jax.nn.log_softmax(z)
    kept = jnp.take_along_axis(log_q_t, ids, axis=1)
    label = jnp.take_along_axis(log_q, labels[:, None], axis=1)
    return -jnp.sum(weights * kept) - jnp.sum(label)


def stats_loss(fn: Callable[..., HeadStats]) -> Callable[..., jax.Array]:
    return lambda h, t, ids, labels, w: loss_from_stats(fn(h, t, ids, labels, temperature=TEMPERATURE), w)


@contextlib.contextmanager
def kernels_as_opaque_calls() -> Iterator[None]:
    """Swap lm_head's pallas_call wrappers for host callbacks of the same output shapes.

    XLA then sees each kernel as one opaque op that allocates only its outputs, which is what a Mosaic kernel
    is to XLA on TPU (its tiles live in VMEM), so the memory analysis measures the XLA code around the kernels.
    """
    names = ("_normalizers", "_grad_hidden", "_grad_table")
    saved = {name: getattr(lm_head, name) for name in names}

    def stand_in(real: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
        def call(*args: Any) -> jax.Array:
            slots = [i for i, a in enumerate(args) if isinstance(a, jax.Array)]

            def with_arrays(*arrays: jax.Array) -> jax.Array:
                full = list(args)
                for i, a in zip(slots, arrays, strict=True):
                    full[i] = a
                return real(*full)

            arrays = [args[i] for i in slots]
            shape = jax.eval_shape(with_arrays, *arrays)
            return jax.pure_callback(lambda *_: jnp.zeros(shape.shape, shape.dtype), shape, *arrays)

        return call

    try:
        for name in names:
            setattr(lm_head, name, stand_in(saved[name]))
        yield
    finally:
        for name, fn in saved.items():
            setattr(lm_head, name, fn)


def temp_bytes(fn: Callable[..., jax.Array], *shapes: jax.ShapeDtypeStruct) -> int:
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def vmem_bytes(tokens_tile: int, vocab_tile: int, dim: int, itemsize: int) -> int:
    """The d_table kernel's VMEM: double-buffered hidden + table tiles, the f32 logits tile, f32 scratch + output."""
    inputs = 2 * (tokens_tile + vocab_tile) * dim * itemsize
    return inputs + tokens_tile * vocab_tile * 4 + 3 * vocab_tile * dim * 4  # scratch + double-buffered output


def memory_section(tokens: int, vocab: int, dim: int, chunk: int) -> None:
    dtype = jnp.float32
    shapes = (
        jax.ShapeDtypeStruct((tokens, dim), dtype),
        jax.ShapeDtypeStruct((vocab, dim), dtype),
        jax.ShapeDtypeStruct((tokens, KEPT), jnp.int32),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
        jax.ShapeDtypeStruct((tokens, KEPT), jnp.float32),
    )
    fused = stats_loss(lambda *a, **k: lm_head.head_stats_pallas(*a, **k, interpret=True))
    naive = temp_bytes(naive_loss, *shapes)
    rows = {
        "naive": naive,
        "chunked": temp_bytes(stats_loss(lambda *a, **k: head_stats(*a, **k, chunk=chunk)), *shapes),
    }
    with kernels_as_opaque_calls():
        rows["fused"] = temp_bytes(fused, *shapes)
    rows["fused-interp"] = temp_bytes(fused, *shapes)
    print(f"\n## LM-head loss memory: {tokens} tokens x vocab {vocab} x dim {dim}, float32, value+grad")
    print(f"{'path':<14}{'temp MiB':>12}{'naive / path':>14}")
    for name, size in rows.items():
        print(f"{name:<14}{size / 2**20:>12.1f}{naive / size:>13.1f}x")
    tile = vmem_bytes(lm_head.DEFAULT_BLOCK_N, lm_head.DEFAULT_BLOCK_V, dim, 4)
    print(
        f"fused kernels' VMEM working set (tiles {lm_head.DEFAULT_BLOCK_N} x {lm_head.DEFAULT_BLOCK_V}): "
        f"{tile / 2**20:.1f} MiB; goal naive / fused >= 20: {'met' if naive / rows['fused'] >= 20 else 'NOT met'}"
    )


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def speed_section(tokens: int, vocab: int, dim: int, repeats: int) -> None:
    keys = jax.random.split(jax.random.key(0), 8)
    print(f"\n## Speed on {jax.devices()[0].device_kind} (best of {repeats})")
    print("kernels run on TPU; elsewhere 'auto' takes the XLA paths, so the ratios then compare XLA code")

    h = jax.random.normal(keys[0], (tokens, dim), jnp.bfloat16)
    table = (jax.random.normal(keys[1], (vocab, dim)) * 0.05).astype(jnp.bfloat16)
    ids = jax.random.randint(keys[2], (tokens, KEPT), 0, vocab)
    labels = jax.random.randint(keys[3], (tokens,), 0, vocab)
    w = jax.nn.softmax(jax.random.normal(keys[4], (tokens, KEPT)), axis=-1)
    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))  # noqa: E731
    naive = grad(naive_loss)
    fused = grad(stats_loss(head_stats_dispatch))
    t_naive, t_fused = (best_time(lambda f=f: f(h, table, ids, labels, w), repeats) for f in (naive, fused))
    print(f"fused loss fwd+bwd: naive {t_naive * 1e3:.1f} ms, fused {t_fused * 1e3:.1f} ms: {t_naive / t_fused:.2f}x")

    batch, heads, kv_heads, head_dim, window = 1, 4, 1, 256, 512
    q = jax.random.normal(keys[5], (batch, tokens, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[6], (batch, tokens, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[7], (batch, tokens, kv_heads, head_dim), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))

    def layer(win: int | None) -> Callable[..., jax.Array]:
        def f(q, k, v):
            return jnp.sum(attention(q, k, v, q_positions=pos, kv_positions=pos, window=win, softcap=None))

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    def reference_layer(q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return jnp.sum(out.astype(jnp.float32))

    t_global = best_time(lambda: layer(None)(q, k, v), repeats)
    t_local = best_time(lambda: layer(window)(q, k, v), repeats)
    t_xla = best_time(lambda: jax.jit(jax.value_and_grad(reference_layer, argnums=(0, 1, 2)))(q, k, v), repeats)
    print(
        f"attention fwd+bwd at {tokens}: global {t_global * 1e3:.2f} ms, window {window} {t_local * 1e3:.2f} ms "
        f"({t_local / t_global:.2f}x of global); jax.nn.dot_product_attention {t_xla * 1e3:.2f} ms "
        f"({t_xla / t_global:.2f}x slower than ours)"
    )

    x = jax.random.normal(keys[0], (tokens, 2048), jnp.bfloat16)
    weight = jax.random.normal(keys[1], (2048, 2048), jnp.float32)
    quantized = quantize_int8(weight)
    t_bf16 = best_time(lambda: jax.jit(jnp.matmul)(x, weight.astype(jnp.bfloat16)), repeats)
    t_int8 = best_time(lambda: jax.jit(quant_matmul)(x, quantized), repeats)
    print(
        f"matmul [{tokens} x 2048] @ [2048 x 2048]: bf16 {t_bf16 * 1e3:.2f} ms, int8 weights "
        f"{t_int8 * 1e3:.2f} ms ({t_bf16 / t_int8:.2f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    memory_section(args.tokens, args.vocab, args.dim, args.chunk)
    if jax.default_backend() == "cpu":
        print("\n## Speed: skipped (no accelerator; run this script on a TPU or GPU for the timing ratios)")
    else:
        speed_section(args.tokens, args.vocab, args.dim, args.repeats)


if __name__ == "__main__":
    main()
