"""Pretraining a from-scratch teacher on the prepared data (the `tiny` profile's teacher).

Resumable exactly: the batch of step s is a function of (seed, s) alone, there is no other randomness, and
checkpoints hold parameters, optimizer state and step, so a killed run continues where its last checkpoint
left off and ends with the same parameters.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from gemstill.checkpoints.native import save_native
from gemstill.config import Gemma3Config
from gemstill.data.format import read_split
from gemstill.distill.input_pipeline import batch_indices
from gemstill.errors import GemstillError
from gemstill.fsutil import atomic_write_bytes
from gemstill.model import build_model
from gemstill.params import ParamBinder, to_flat
from gemstill.plots import save_loss_curve
from gemstill.tokenizer import Tokenizer

_COLUMNS = ("tokens", "positions", "segment_ids", "loss_mask")


class PretrainConfig(BaseModel):
    """AdamW with linear warmup then cosine decay; cross-entropy on the loss-masked tokens."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    clip_norm: float = Field(1.0, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(100, ge=1)
    eval_batches: int = Field(4, ge=1)


def masked_cross_entropy(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean NLL of token i given tokens < i, over positions whose loss_mask is 1."""
    logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]
    weights = loss_mask[:, 1:].astype(jnp.float32)
    return -(picked * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def _optimizer(settings: PretrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.learning_rate, settings.warmup_steps, max(settings.steps, settings.warmup_steps + 1)
    )
    return optax.chain(
        optax.clip_by_global_norm(settings.clip_norm), optax.adamw(schedule, weight_decay=settings.weight_decay)
    )


def pretrain(
    model_config: Gemma3Config,
    settings: PretrainConfig,
    data_dir: Path,
    out_dir: Path,
    log: Callable[[str], None] = print,
    persist: Callable[[Path], None] = lambda path: None,
    report_progress: Callable[[float], None] = lambda fraction: None,
) -> dict[str, Any]:
    """Train, checkpointing to out_dir/checkpoints; write the final model to out_dir/model (native format).

    persist: called with the checkpoint directory after each checkpoint, to mirror it to the store."""
    tokenizer = Tokenizer.from_file(data_dir / "tokenizer.model")
    if tokenizer.vocab_size > model_config.vocab_size:
        raise GemstillError(
            f"the data's tokenizer has {tokenizer.vocab_size} ids but the teacher's vocab_size is "
            f"{model_config.vocab_size}; raise teacher.scratch.architecture.vocab_size"
        )
    train, validation = read_split(data_dir, "train"), read_split(data_dir, "validation")
    rows = len(train["tokens"])
    model = build_model(model_config, seed=settings.seed)
    bind = ParamBinder(model)
    optimizer = _optimizer(settings)

    def loss_fn(params, batch):
        out = bind(params)(
            batch["tokens"], batch["positions"], mask=batch["segment_ids"] > 0, segment_ids=batch["segment_ids"]
        )
        return masked_cross_entropy(out.logits, batch["tokens"], batch["loss_mask"])

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

    eval_loss = jax.jit(loss_fn)
    ckpt_dir = (out_dir / "checkpoints").absolute()
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2))
    params = to_flat(model)
    opt_state = optimizer.init(params)
    history: list[dict[str, float]] = []
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        restored = manager.restore(
            start, args=ocp.args.StandardRestore({"params": params, "opt_state": opt_state, "history": []})
        )
        params, opt_state, history = restored["params"], restored["opt_state"], list(restored["history"])
        log(f"pretrain: resuming from step {start}")

    began = time.perf_counter()
    tokens_seen = 0
    for step in tqdm(range(start, settings.steps), desc="pretrain teacher", initial=start, total=settings.steps):
        rows_now = batch_indices(step, settings.batch_size, rows, settings.seed)
        batch = {k: jnp.asarray(train[k][rows_now]) for k in _COLUMNS}
        params, opt_state, loss, grad_norm = train_step(params, opt_state, batch)
        loss = float(loss)
        if not np.isfinite(loss):
            raise GemstillError(
                f"pretrain: loss became {loss} at step {step}; lower teacher.scratch.training.learning_rate "
                "(the last good checkpoint is kept)"
            )
        history.append({"step": step + 1, "loss": loss, "grad_norm": float(grad_norm)})
        tokens_seen += int(batch["segment_ids"].astype(bool).sum())
        report_progress((step + 1) / settings.steps)
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            manager.save(
                step + 1,
                args=ocp.args.StandardSave({"params": params, "opt_state": opt_state, "history": history}),
            )
            manager.wait_until_finished()
            persist(ckpt_dir)
            log(f"pretrain: step {step + 1}/{settings.steps} loss {loss:.4f} (checkpoint saved)")
    manager.close()
    seconds = time.perf_counter() - began

    val_batches = [
        {k: jnp.asarray(validation[k][i : i + settings.batch_size]) for k in _COLUMNS}
        for i in range(0, len(validation["tokens"]), settings.batch_size)
    ][: settings.eval_batches]
    val_loss = float(np.mean([float(eval_loss(params, b)) for b in val_batches])) if val_batches else float("nan")
    save_native(out_dir / "model", model_config, params, tokenizer.model_proto)
    save_loss_curve(out_dir / "loss_curve.png", history, title="teacher pretraining")
    atomic_write_bytes(out_dir / "history.json", json.dumps(history).encode())
    return {
        "steps": settings.steps,
        "final_train_loss": history[-1]["loss"],
        "validation_loss": val_loss,
        "validation_perplexity": float(np.exp(val_loss)),
        "tokens_per_second": tokens_seen / seconds if seconds > 0 and tokens_seen else None,
        "parameters": int(sum(np.prod(np.shape(v)) for v in params.values())),
    }
