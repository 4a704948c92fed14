"""What `implementation="auto"` runs: the Pallas kernels on TPU once a compiled check has passed in this process.

A kernel that Mosaic miscompiles on some TPU generation or jaxlib would train silently wrong, so before "auto"
trusts the kernels, `check_kernels` compiles a tiny forward and backward of each (LM-head stats, attention) and
compares them with the XLA path. The outcome is memoized per process and logged once on the "gemstill.kernels"
logger; a failure (an exception or a mismatch) or a backend other than TPU sends "auto" to XLA.
`describe_auto()` is the one line a training run logs about it.
"""

from __future__ import annotations

import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .attention import attention_reference, flash_attention
from .chunked_head import head_stats
from .lm_head import head_stats_pallas

logger = logging.getLogger("gemstill.kernels")

# largest |kernel - XLA| allowed, relative to max(1, largest |XLA value|): TPU matmuls at default precision
# round float32 operands to bfloat16 (2^-8 relative), while a miscompiled kernel is off by order 1
TOLERANCE = 2e-2


class AutoChoice(NamedTuple):
    pallas: bool  # True: "auto" runs the Pallas kernels
    reason: str  # one line: why


class KernelCheckError(AssertionError):
    """A compiled kernel disagreed with its XLA path beyond TOLERANCE."""


def _backend() -> str:
    return jax.default_backend()


def _error(got: Any, want: Any) -> float:
    """The largest relative error over the leaves of two matching trees (NaN counts as infinite)."""
    worst = 0.0
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        err = np.max(np.abs(g - w)) / max(1.0, float(np.max(np.abs(w))))
        worst = max(worst, float(err) if np.isfinite(err) else float("inf"))
    return worst


def _value_and_grads(fn, args: tuple[jax.Array, ...], seed: int):
    """fn(*args) and the gradients of a random linear function of its outputs, jitted."""
    outputs = jax.tree.leaves(jax.eval_shape(fn, *args))
    keys = jax.random.split(jax.random.key(seed), len(outputs))
    weights = [jax.random.normal(k, o.shape) for k, o in zip(keys, outputs, strict=True)]

    def scalar(*xs):
        return sum(jnp.sum(w * o) for w, o in zip(weights, jax.tree.leaves(fn(*xs)), strict=True))

    return jax.jit(lambda *xs: (fn(*xs), jax.grad(scalar, argnums=tuple(range(len(xs))))(*xs)))(*args)


def _lm_head_case(interpret: Any) -> tuple[Any, Any]:
    """(kernel, XLA) outputs and gradients: 40 tokens over 2 token tiles, vocabulary 500 over 2 padded tiles."""
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((40, 128)), jnp.float32)
    table = jnp.asarray(rng.standard_normal((500, 128)) * 0.1, jnp.float32)
    ids = jnp.asarray(rng.integers(0, 500, (40, 4)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, 500, 40), jnp.int32)

    def kernel(h, t):
        return head_stats_pallas(h, t, ids, labels, temperature=2.0, block_n=32, block_v=256, interpret=interpret)

    def xla(h, t):
        return head_stats(h, t, ids, labels, temperature=2.0)

    return _value_and_grads(kernel, (hidden, table), 1), _value_and_grads(xla, (hidden, table), 1)


def _attention_case(steps: int, window: int | None, interpret: Any) -> tuple[Any, Any]:
    """(kernel, XLA) outputs and gradients: GQA 2:1, blocks of 128 steps."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, steps, heads, 128)), jnp.float32) for heads in (2, 1, 1))
    positions = jnp.arange(steps, dtype=jnp.int32)[None]
    opts = {"q_positions": positions, "kv_positions": positions, "window": window, "softcap": None}

    def kernel(q, k, v):
        return flash_attention(q, k, v, **opts, block_q=128, block_kv=128, interpret=interpret)

    def xla(q, k, v):
        return attention_reference(q, k, v, **opts)

    return _value_and_grads(kernel, (q, k, v), 2), _value_and_grads(xla, (q, k, v), 2)


def _errors(interpret: Any) -> dict[str, float]:
    return {
        "lm_head": _error(*_lm_head_case(interpret)),
        "attention_global": _error(*_attention_case(256, None, interpret)),
        # 4 kv blocks, of which a 100-step window needs 3: the block-skipping grid and its full-range fallback
        "attention_local": _error(*_attention_case(512, 100, interpret)),
    }


def check_kernels(interpret: Any = False) -> dict[str, float]:
    """Each kernel's largest relative error against XLA over a tiny forward and backward; raises past TOLERANCE.

    interpret=False compiles the kernels (what "auto" needs on TPU); True runs them in the Pallas interpreter,
    so the check itself is tested on CPU. It runs in a thread of its own: JAX's trace state is per thread, so a
    check that "auto" starts while a training step is being traced still runs eagerly.
    """
    with ThreadPoolExecutor(1) as pool:
        errors = pool.submit(_errors, interpret).result()
    bad = {name: err for name, err in errors.items() if not err <= TOLERANCE}
    if bad:
        raise KernelCheckError(
            f"relative error above {TOLERANCE:g}: " + ", ".join(f"{n} {e:.2e}" for n, e in bad.items())
        )
    return errors


@functools.cache
def auto_choice() -> AutoChoice:
    """Pallas on TPU when `check_kernels` passes, else XLA; decided once per process and logged."""
    backend = _backend()
    if backend != "tpu":
        return _logged(AutoChoice(False, f"XLA: the backend is {backend}; the Pallas kernels are built for TPU"))
    try:
        worst = max(check_kernels().values())
    except Exception as exc:  # failing to compile or run counts as failing the check: XLA is always correct
        detail = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        return _logged(AutoChoice(False, f"XLA: the compiled kernel check failed on TPU: {detail}"), exc)
    return _logged(AutoChoice(True, f"Pallas: the compiled kernel check passed on TPU (error {worst:.1e})"))


def _logged(choice: AutoChoice, exc: Exception | None = None) -> AutoChoice:
    level = logging.WARNING if exc is not None else logging.INFO
    logger.log(level, "training.kernels auto -> %s", choice.reason, exc_info=exc)
    return choice


def describe_auto() -> str:
    """One line for a run's log: what "auto" runs in this process and why (runs the check if not yet run)."""
    return f"training.kernels auto -> {auto_choice().reason}"
