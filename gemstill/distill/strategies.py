"""The loss terms of a training run, each a small strategy object with one loss method (as Tunix's distillation
strategies are): what the objective adds up for one micro-batch.

- `LogitTerm`: alpha * T^2 * divergence(teacher || student) + (1 - alpha) * cross-entropy on the LM head, from
  the teacher cache; with no cache it is cross-entropy alone (the baseline, and a teacher pretrained here).
- `HiddenTerm` and `AttentionTerm`: intermediate-layer matching against the teacher run inside the step.

QAT adds no term: it changes what the student's forward pass sees (`Run.fake_quant`), not what it is scored on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal, Protocol

import jax
import jax.numpy as jnp

from gemstill.distill.config import DistillConfig, schedule_value
from gemstill.distill.losses import TeacherTargets, attention_loss, hidden_loss, logit_loss
from gemstill.distill.run import PROJECTION, Run
from gemstill.kernels.dispatch import head_stats_dispatch
from gemstill.model import ModelOutput

TERMS = ("loss", "distill", "cross_entropy", "hidden", "attention")  # what every step reports


@dataclasses.dataclass(frozen=True)
class LogitTerm:
    """The LM-head term, computed chunked over the vocabulary from the final hidden state (never full logits)."""

    objective: DistillConfig
    total_steps: int
    use_cache: bool  # False: no teacher targets, cross-entropy only
    cache_temperature: float
    softcap: float | None
    chunk: int
    kernels: str

    @classmethod
    def for_run(cls, run: Run) -> LogitTerm:
        return cls(
            objective=run.objective,
            total_steps=run.training.steps,
            use_cache=run.cache_dir is not None,
            cache_temperature=run.teacher.cache_temperature if run.teacher is not None else 1.0,
            softcap=run.student.final_logit_softcap,
            chunk=run.training.loss_chunk,
            kernels=run.training.kernels,
        )

    def loss(
        self, final_hidden: jax.Array, embedding: jax.Array, micro: Mapping[str, jax.Array], step, total_weight
    ) -> dict[str, jax.Array]:
        """ "loss", "distill" and "cross_entropy" of the micro-batch, each summed over its tokens / total_weight."""
        obj = self.objective
        batch, length, dim = final_hidden.shape
        hidden = final_hidden.reshape(batch * length, dim)
        if self.use_cache:
            targets = TeacherTargets(
                micro["ids"].reshape(batch * length, -1),
                micro["logprobs"].reshape(batch * length, -1),
                micro["tail_mass"].reshape(-1),
            )
        else:
            zeros = jnp.zeros((batch * length, 1), jnp.int32)
            targets = TeacherTargets(zeros, zeros.astype(jnp.float32), jnp.zeros(batch * length, jnp.float32))
        temperature = jnp.asarray(schedule_value(obj.temperature, step, self.total_steps), jnp.float32)
        alpha = jnp.asarray(schedule_value(obj.alpha, step, self.total_steps), jnp.float32) if self.use_cache else 0.0
        stats = head_stats_dispatch(
            hidden,
            embedding.astype(hidden.dtype),
            targets.ids,
            micro["labels"].reshape(-1),
            temperature=temperature,
            softcap=self.softcap,
            chunk=self.chunk,
            implementation=self.kernels,
        )
        terms = logit_loss(
            stats,
            targets,
            kind=obj.divergence,
            tail=obj.tail,
            alpha=alpha,
            beta=jnp.asarray(schedule_value(obj.beta, step, self.total_steps), jnp.float32),
            temperature=temperature,
            cache_temperature=self.cache_temperature,
        )
        weights = micro["weights"].reshape(-1)
        return {
            "loss": (terms.total * weights).sum() / total_weight,
            "distill": (terms.distill * weights).sum() / total_weight if self.use_cache else jnp.zeros(()),
            "cross_entropy": (terms.cross_entropy * weights).sum() / total_weight,
        }


class IntermediateTerm(Protocol):
    """A term on the activations of mapped (student layer, teacher layer) pairs, averaged over the pairs."""

    name: str  # its entry in TERMS
    weight: float
    pairs: tuple[tuple[int, int], ...]
    needs_hidden: bool  # the passes must return every block's output
    needs_attention: bool  # the passes must return the mapped layers' attention maps

    def loss(
        self, student: ModelOutput, teacher: ModelOutput, params: Mapping[str, jax.Array], real: jax.Array
    ) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class HiddenTerm:
    """Each mapped student block's output matched to its teacher block's (through a learned projection when the
    widths differ): gemstill.distill.losses.hidden_loss."""

    weight: float
    pairs: tuple[tuple[int, int], ...]
    kind: Literal["mse", "cosine"]
    name: str = "hidden"
    needs_hidden: bool = True
    needs_attention: bool = False

    def loss(self, student: ModelOutput, teacher: ModelOutput, params, real: jax.Array) -> jax.Array:
        total = jnp.zeros(())
        for s, t in self.pairs:  # hidden_states[0] is the embedding output, so block l's output is at l + 1
            student_out, teacher_out = student.hidden_states[s + 1], teacher.hidden_states[t + 1]
            total += hidden_loss(student_out, teacher_out, params.get(f"{PROJECTION}{s}"), real, self.kind)
        return total / len(self.pairs)


@dataclasses.dataclass(frozen=True)
class AttentionTerm:
    """Each mapped student layer's head-averaged attention map matched to its teacher layer's (KL)."""

    weight: float
    pairs: tuple[tuple[int, int], ...]
    name: str = "attention"
    needs_hidden: bool = False
    needs_attention: bool = True

    def loss(self, student: ModelOutput, teacher: ModelOutput, params, real: jax.Array) -> jax.Array:
        total = jnp.zeros(())
        for s, t in self.pairs:
            total += attention_loss(student.attention_probs[s], teacher.attention_probs[t], real)
        return total / len(self.pairs)


def intermediate_terms(run: Run) -> tuple[IntermediateTerm, ...]:
    """The intermediate terms the objective weights above zero, when the run has the teacher's parameters."""
    if run.online_teacher_params is None or not run.pairs:
        return ()
    obj = run.objective
    terms: list[IntermediateTerm] = []
    if obj.hidden.weight > 0:
        terms.append(HiddenTerm(obj.hidden.weight, run.pairs, obj.hidden.kind))
    if obj.attention.weight > 0:
        terms.append(AttentionTerm(obj.attention.weight, run.pairs))
    return tuple(terms)
