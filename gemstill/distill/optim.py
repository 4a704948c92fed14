"""The optimizers a student trains with, built from the profile's `training.optimizer` section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import optax

from gemstill.distill.config import OptimizerConfig


def learning_rate_schedule(settings: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to final_lr_fraction of it at the last step."""
    decay_steps = max(total_steps, settings.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        0.0,
        settings.learning_rate,
        settings.warmup_steps,
        decay_steps,
        end_value=settings.learning_rate * settings.final_lr_fraction,
    )


def is_frozen(name: str, freeze: Sequence[str]) -> bool:
    """Whether parameter `name` is held fixed by a freeze list of exact names or dotted prefixes."""
    return any(name == f or name.startswith(f + ".") for f in freeze)


def make_optimizer(
    settings: OptimizerConfig, total_steps: int, freeze: Sequence[str] = ()
) -> optax.GradientTransformation:
    """AdamW after global-norm clipping, or Adafactor (which clips its own updates by RMS); frozen parameters get
    no update and no optimizer state."""
    optimizer = _base_optimizer(settings, total_steps)
    if not freeze:
        return optimizer

    def labels(params: Mapping[str, object]) -> dict[str, str]:
        return {name: "frozen" if is_frozen(name, freeze) else "trained" for name in params}

    return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)


def _base_optimizer(settings: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    lr = learning_rate_schedule(settings, total_steps)
    if settings.name == "adamw":
        return optax.chain(
            optax.clip_by_global_norm(settings.clip_norm),
            optax.adamw(lr, b1=settings.b1, b2=settings.b2, eps=settings.eps, weight_decay=settings.weight_decay),
        )
    return optax.adafactor(
        lr,
        decay_rate=settings.decay_rate,
        clipping_threshold=settings.clipping_threshold,
        eps=settings.eps_factored,
        multiply_by_parameter_scale=settings.multiply_by_parameter_scale,
        weight_decay_rate=settings.weight_decay or None,
    )
