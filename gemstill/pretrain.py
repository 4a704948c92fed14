"""Pretraining a from-scratch teacher on the prepared data (the `tiny` profile's teacher).

It is the same `train()` the students use, on a cross-entropy-only run with no teacher: one loop for every
model, so pretraining shares its exact resume after a kill, the NaN stop, checkpoints mirrored to the store,
best-by-validation selection, sharding, the prefetched input and the optimizers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from gemstill.config import Gemma3Config
from gemstill.distill.config import PRETRAIN_SECTION, DistillConfig, PretrainConfig
from gemstill.distill.run import Run
from gemstill.distill.train import train
from gemstill.errors import GemstillError
from gemstill.model import build_model
from gemstill.params import to_flat
from gemstill.tokenizer import Tokenizer


def pretrain(
    model_config: Gemma3Config,
    settings: PretrainConfig,
    data_dir: Path,
    out_dir: Path,
    log: Callable[[str], None] = print,
    mesh: Mesh | None = None,
    persist: Callable[[Path], None] | None = None,
    report_progress: Callable[[float], None] = lambda fraction: None,
) -> dict[str, Any]:
    """Train from a random init (seed `settings.seed`) on cross-entropy, resuming from out_dir/checkpoints; write
    out_dir/model (native), metrics.jsonl and loss_curve.png, as train() does for a student."""
    tokenizer = Tokenizer.from_file(data_dir / "tokenizer.model")
    if tokenizer.vocab_size > model_config.vocab_size:
        raise GemstillError(
            f"the data's tokenizer has {tokenizer.vocab_size} ids but the teacher's vocab_size is "
            f"{model_config.vocab_size}; raise teacher.scratch.architecture.vocab_size"
        )
    run = Run(
        student=model_config,
        init_params=to_flat(build_model(model_config, seed=settings.seed)),
        pairs=(),
        objective=DistillConfig(alpha=0.0),
        training=settings,
        teacher=None,
        title="teacher",
        learning_rate_key=f"{PRETRAIN_SECTION}.optimizer.learning_rate",
    )
    result = train(run, data_dir, out_dir, tokenizer.model_proto, log, mesh, persist, report_progress)
    parameters = result.pop("student_parameters")
    return {**result, "validation_perplexity": float(np.exp(result["validation_loss"])), "parameters": parameters}
