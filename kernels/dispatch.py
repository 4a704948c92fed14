"""The kernel dispatches: each picks the Pallas kernel or its XLA path for `implementation`, and calls it.

`implementation` is "auto" or one of the explicit implementations of gemstill.kernels._dispatch ("xla",
"pallas", "interpret", "interpret_tpu"). "auto" is the Pallas kernel on TPU once a compiled check has passed in
this process (gemstill.kernels.auto), the XLA path elsewhere (CPU, and GPU until the Mosaic GPU ports land) or
when the check fails.

This is the top layer of gemstill.kernels, as in JAX's Pallas ops and megablox (kernels beside their references,
a thin dispatch over them): it imports `auto` and the kernel modules; neither imports it, and no kernel module
imports `auto`, whose check runs the kernels.
"""

from __future__ import annotations

from typing import Any

import jax

from ._dispatch import EXPLICIT, resolve_explicit
from ._mesh import AnyMesh
from .attention import DEFAULT_BLOCK_KV, DEFAULT_BLOCK_Q, attention_reference, flash_attention_on_mesh
from .auto import auto_choice
from .chunked_head import DEFAULT_CHUNK, HeadStats, head_stats
from .lm_head import DEFAULT_BLOCK_N, DEFAULT_BLOCK_V, head_stats_pallas_on_mesh
from .quant_matmul import DEFAULT_BLOCK_K as QUANT_BLOCK_K
from .quant_matmul import DEFAULT_BLOCK_M as QUANT_BLOCK_M
from .quant_matmul import DEFAULT_BLOCK_N as QUANT_BLOCK_N
from .quant_matmul import QuantizedWeight, quant_matmul_pallas, quant_matmul_xla

IMPLEMENTATIONS = ("auto", *EXPLICIT)


def resolve(implementation: str) -> tuple[bool, Any]:
    """(use the Pallas kernel?, the `interpret` argument for pallas_call) for a dispatch's `implementation`."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: use one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        return auto_choice().pallas, False
    return resolve_explicit(implementation)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segments: jax.Array | None = None,
    kv_segments: jax.Array | None = None,
    window: int | None,
    softcap: float | None,
    implementation: str = "auto",
    block_q: int = DEFAULT_BLOCK_Q,
    block_kv: int = DEFAULT_BLOCK_KV,
    mesh: AnyMesh | None = None,
) -> jax.Array:
    """The flash kernels on TPU, `attention_reference` elsewhere (gemstill.kernels.attention).

    q [B,T,N,H] (RoPE'd, normed, times the query scale), k/v [B,S,K,H] with K dividing N; positions [B,T]/[B,S]
    int32 (-1: padding key); segments [B,T]/[B,S] or None. Rows with no visible key differ (see that module's doc).
    mesh: where the kernels run split over examples and heads (default: the mesh set by jax.set_mesh, if any);
    see gemstill.kernels._mesh.plan for when they run unsplit. The XLA path ignores it.
    """
    use_kernel, interpret = resolve(implementation)
    if not use_kernel:
        return attention_reference(
            q,
            k,
            v,
            q_positions=q_positions,
            kv_positions=kv_positions,
            q_segments=q_segments,
            kv_segments=kv_segments,
            window=window,
            softcap=softcap,
        )
    return flash_attention_on_mesh(
        q,
        k,
        v,
        q_positions=q_positions,
        kv_positions=kv_positions,
        q_segments=q_segments,
        kv_segments=kv_segments,
        window=window,
        softcap=softcap,
        block_q=block_q,
        block_kv=block_kv,
        interpret=interpret,
        mesh=mesh,
    )


def head_stats_dispatch(
    hidden: jax.Array,
    table: jax.Array,
    ids: jax.Array,
    labels: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    softcap: float | None = None,
    chunk: int = DEFAULT_CHUNK,
    implementation: str = "auto",
    block_n: int = DEFAULT_BLOCK_N,
    block_v: int = DEFAULT_BLOCK_V,
    mesh: AnyMesh | None = None,
) -> HeadStats:
    """HeadStats of hidden [N, D] @ table [V, D]^T: the Pallas kernel on TPU (gemstill.kernels.lm_head), chunked
    XLA otherwise (gemstill.kernels.chunked_head).

    `chunk` is the XLA path's token chunk; block_n/block_v size the kernel's tiles (shrunk to fit small inputs).
    implementation: "auto", "xla", "pallas", "interpret" or "interpret_tpu" (see the module doc).
    mesh: where the kernel runs split over tokens (default: the mesh set by jax.set_mesh, if any); see
    gemstill.kernels._mesh.plan for when it runs unsplit. The XLA path ignores it.
    """
    use_kernel, interpret = resolve(implementation)
    if not use_kernel:
        return head_stats(hidden, table, ids, labels, temperature=temperature, softcap=softcap, chunk=chunk)
    return head_stats_pallas_on_mesh(
        hidden,
        table,
        ids,
        labels,
        temperature=temperature,
        softcap=softcap,
        block_n=block_n,
        block_v=block_v,
        interpret=interpret,
        mesh=mesh,
    )


def quant_matmul(
    x: jax.Array,
    qw: QuantizedWeight,
    *,
    implementation: str = "auto",
    block_m: int = QUANT_BLOCK_M,
    block_n: int = QUANT_BLOCK_N,
    block_k: int = QUANT_BLOCK_K,
) -> jax.Array:
    """x [M, K] (bf16 or f32) @ the quantized weight -> [M, N] in x's dtype; gradient for x only.

    implementation: see the module doc. The XLA path dequantizes to x's dtype and multiplies
    (gemstill.kernels.quant_matmul).
    """
    use_kernel, interpret = resolve(implementation)
    if not use_kernel:
        return quant_matmul_xla(x, qw)
    return quant_matmul_pallas(x, qw, block_m=block_m, block_n=block_n, block_k=block_k, interpret=interpret)
