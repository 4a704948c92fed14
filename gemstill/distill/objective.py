"""The training objective of one micro-batch: the student's forward pass (with the run's training knobs), the
teacher's when an intermediate term needs it, and the sum of the run's loss terms (gemstill.distill.strategies)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from gemstill.distill.optim import is_frozen
from gemstill.distill.run import Run, student_params
from gemstill.distill.strategies import TERMS, LogitTerm, intermediate_terms
from gemstill.model import ModelOutput, build_model
from gemstill.params import ParamBinder
from gemstill.quant.weights import fake_quant_params

Loss = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def layer_drop_scales(rate: float, layers: int, key: jax.Array) -> jax.Array:
    """Progressive layer dropout: layer l is skipped with probability rate * (l + 1) / layers (deeper layers drop
    more), and a kept layer's residual update is scaled by 1 / keep probability."""
    rates = rate * (jnp.arange(layers) + 1) / layers
    keep = jax.random.uniform(key, (layers,)) >= rates
    return jnp.where(keep, 1.0 / (1.0 - rates), 0.0)


def forward(
    model, micro: Mapping[str, jax.Array], hidden: bool, attention_layers: tuple[int, ...], **knobs
) -> ModelOutput:
    """A forward pass over a packed micro-batch up to the final hidden state (the LM head runs chunked in the
    logit term), with every block's output when `hidden` and the attention maps of `attention_layers`."""
    segments = micro["segment_ids"]
    return model(
        micro["tokens"],
        micro["positions"],
        mask=segments > 0,
        segment_ids=segments,
        return_logits=False,
        return_hidden=hidden,
        attention_prob_layers=attention_layers,
        **knobs,
    )


def make_loss(run: Run) -> Loss:
    """loss(params, teacher_params, micro, step, key, total_weight, train=True) -> (scalar, terms) for one
    micro-batch; every term is already divided by the whole step's loss-token count `total_weight`."""
    training = run.training
    student_bind = ParamBinder(build_model(run.student, seed=0))
    logit = LogitTerm.for_run(run)
    extras = intermediate_terms(run)
    teacher_bind = ParamBinder(build_model(run.teacher.config, seed=0)) if extras else None
    hidden = any(term.needs_hidden for term in extras)
    attention = tuple(dict.fromkeys(p for term in extras if term.needs_attention for p in term.pairs))
    drop_layers = training.layer_drop > 0

    def loss(params, teacher_params, micro, step, key, total_weight, train: bool = True):
        params = {k: jax.lax.stop_gradient(v) if is_frozen(k, training.freeze) else v for k, v in params.items()}
        arrays = student_params(params)
        if run.fake_quant is not None:  # frozen weights were put on the grid by initial_params
            trained = {k: v for k, v in arrays.items() if not is_frozen(k, training.freeze)}
            arrays.update(fake_quant_params(run.student, trained, run.fake_quant.fmt, run.fake_quant.embedding))
        student = student_bind(arrays)
        out = forward(
            student,
            micro,
            hidden,
            tuple(s for s, _ in attention),
            layer_scale=layer_drop_scales(training.layer_drop, run.student.num_layers, key)
            if train and drop_layers
            else None,
            remat=training.remat if train else None,
            attention_impl=training.kernels,
        )
        parts = {name: jnp.zeros(()) for name in TERMS}
        parts.update(logit.loss(out.final_hidden, student.embedding[...], micro, step, total_weight))
        if extras:
            teacher = teacher_bind(jax.lax.stop_gradient(teacher_params))
            teacher_out = forward(teacher, micro, hidden, tuple(t for _, t in attention))
            real = micro["segment_ids"] > 0
            share = micro["weights"].sum() / total_weight  # this micro-batch's share of the step's tokens
            for term in extras:
                parts[term.name] = share * term.loss(out, teacher_out, params, real)
                parts["loss"] += term.weight * parts[term.name]
        return parts["loss"], parts

    return loss
