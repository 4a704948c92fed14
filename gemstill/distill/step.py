"""One jitted optimizer step: gradients summed over the step's micro-batches in a scan, then one update."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gemstill.distill.objective import make_loss
from gemstill.distill.run import Run
from gemstill.distill.strategies import TERMS


def make_train_step(run: Run, optimizer: optax.GradientTransformation, out_shardings: Any = None) -> Callable[..., Any]:
    """step(params, opt_state, teacher_params, batch, step) -> (params, opt_state, terms, grad_norm).

    batch leaves are [grad_accum, micro_batch, L]; each micro-batch's loss is already divided by the whole step's
    token count, so the sum over micro-batches is the step's mean. Random draws (layer dropout) are keyed by
    (seed, step, micro-batch) alone, which keeps a resumed run exact.
    """
    loss = make_loss(run)
    base_key = jax.random.key(run.training.seed)

    def step_fn(params, opt_state, teacher_params, batch, step):
        total_weight = jnp.maximum(batch["weights"].sum(), 1.0)
        step_key = jax.random.fold_in(base_key, step)

        def micro_step(carry, inputs):
            grads, terms = carry
            index, micro = inputs
            key = jax.random.fold_in(step_key, index)
            (_, parts), micro_grads = jax.value_and_grad(loss, has_aux=True)(
                params, teacher_params, micro, step, key, total_weight
            )
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            terms = {name: terms[name] + parts[name] for name in terms}
            return (grads, terms), None

        zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zero_terms = {name: jnp.zeros(()) for name in TERMS}
        accum = batch["weights"].shape[0]
        (grads, terms), _ = jax.lax.scan(micro_step, (zero_grads, zero_terms), (jnp.arange(accum), batch))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, terms, optax.tree.norm(grads)

    if out_shardings is None:
        return jax.jit(step_fn, donate_argnums=(0, 1))
    return jax.jit(step_fn, donate_argnums=(0, 1), out_shardings=out_shardings)
