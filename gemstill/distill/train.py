"""The training loop: one `train()` for every run (the distilled student, the cross-entropy baseline, QAT and the
from-scratch teacher's pretraining), reading top to bottom: place the arrays, resume, step, log and check every
`log_every` steps, validate, checkpoint, then write the best-validated model.

Exact resume: the rows of step s and every random draw in it (layer dropout) are functions of (seed, s) alone,
and checkpoints hold parameters, optimizer state and the step, so a run killed at any moment and resumed from
its latest checkpoint replays the same steps and ends with the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from gemstill import distributed
from gemstill.checkpoints.native import save_native
from gemstill.distill.checkpointing import TrainCheckpointer
from gemstill.distill.flops import train_flops_per_token
from gemstill.distill.input_pipeline import Batches, StepBatches
from gemstill.distill.objective import Loss, make_loss
from gemstill.distill.optim import is_frozen, learning_rate_schedule, make_optimizer
from gemstill.distill.placement import Placement, place_rows, process_rows
from gemstill.distill.run import Run, initial_params, student_params
from gemstill.distill.step import make_train_step
from gemstill.distill.strategies import TERMS
from gemstill.distill.throughput import Throughput
from gemstill.errors import GemstillError
from gemstill.fsutil import atomic_write_bytes
from gemstill.plots import save_loss_curve


def evaluate_objective(
    run: Run,
    loss: Loss,
    params,
    teacher_params,
    batches: Batches,
    count: int,
    batch_size: int,
    place: Placement | None = None,
) -> dict:
    """The training objective's terms on the first `count` batches of a split, without layer dropout; `loss` is
    jax.jit(make_loss(run), static_argnames="train"), compiled once per run by the caller: a short last batch is
    padded to batch_size with empty rows (no tokens, no weight), so every call has the same shapes. With a
    placement on a mesh the rows are split over data x fsdp, each process reading its own."""
    place = place or Placement(None, run.training)
    key = place.key(0)
    sharding = place.rows()
    block = process_rows(sharding, batch_size, axis=0, rank=2)  # the rows this process reads, in every batch
    totals = {name: 0.0 for name in TERMS}
    seen = 0
    for start in range(0, min(count * batch_size, batches.rows), batch_size):
        real = min(start + batch_size, batches.rows) - start
        rows = np.minimum(np.arange(start, start + batch_size), batches.rows - 1)
        host = batches.get(rows[block])
        padding = np.arange(batch_size)[block] >= real
        host["segment_ids"][padding] = 0  # padding rows: every position masked, as a packed row's padding is
        host["weights"][padding] = 0
        weight = batches.weight(rows[:real])
        if weight == 0:
            continue
        batch = place_rows(host, sharding, batch_size, axis=0)
        _, parts = loss(params, teacher_params, batch, run.training.steps - 1, key, weight, train=False)
        for name in totals:
            totals[name] += float(parts[name]) * weight
        seen += weight
    return {name: value / max(seen, 1.0) for name, value in totals.items()}


def train(
    run: Run,
    data_dir: Path,
    out_dir: Path,
    tokenizer_model: bytes | None,
    log: Callable[[str], None] = print,
    mesh: Mesh | None = None,
    persist: Callable[[Path], None] | None = None,
    report_progress: Callable[[float], None] = lambda fraction: None,
) -> dict[str, Any]:
    """Train (resuming from out_dir/checkpoints when a killed attempt left one), then write out_dir/model (native),
    metrics.jsonl and loss_curve.png. With a mesh, parameters, optimizer state and batches are sharded on it (its
    devices may span processes: every process runs train(), process 0 writes the model and metrics), and the
    Pallas kernels run under shard_map over it.

    persist: called with the checkpoint directory once each checkpoint is written, to mirror it to the store.
    report_progress: called with the fraction of steps done after each step.
    """
    if run.training.kernels == "auto":
        from gemstill.kernels.auto import describe_auto

        log(f"{run.title}: {describe_auto()}")
    if mesh is None:
        return _train(run, data_dir, out_dir, tokenizer_model, log, mesh, persist, report_progress)
    with jax.set_mesh(mesh):  # the kernels read the mesh when the step is traced
        return _train(run, data_dir, out_dir, tokenizer_model, log, mesh, persist, report_progress)


def _train(
    run: Run,
    data_dir: Path,
    out_dir: Path,
    tokenizer_model: bytes | None,
    log: Callable[[str], None],
    mesh: Mesh | None,
    persist: Callable[[Path], None] | None,
    report_progress: Callable[[float], None],
) -> dict[str, Any]:
    training = run.training
    optimizer = make_optimizer(training.optimizer, training.steps, training.freeze)
    lr_at = learning_rate_schedule(training.optimizer, training.steps)
    train_batches = Batches(data_dir, run.cache_dir, "train")
    val_batches = Batches(data_dir, run.cache_dir, "validation")
    for entry in training.freeze:
        if not any(is_frozen(name, [entry]) for name in run.init_params):
            raise GemstillError(
                f"training.freeze: {entry!r} matches no student parameter; use a name such as 'embedding' or 'layers.0'"
            )
    place = Placement(mesh, training)
    params, param_shardings = place.params(initial_params(run))
    opt_state, state_shardings = place.optimizer_state(optimizer, params, param_shardings)
    teacher_params = run.online_teacher_params
    if teacher_params is not None:
        teacher_params = place.params(dict(teacher_params))[0]
    out_shardings = None
    if mesh is not None:
        scalar = place.replicated()
        out_shardings = (param_shardings, state_shardings, {name: scalar for name in TERMS}, scalar)
    step_fn = make_train_step(run, optimizer, out_shardings)
    eval_loss = jax.jit(make_loss(run), static_argnames="train")
    checkpointer = TrainCheckpointer(out_dir / "checkpoints", keep=training.keep_checkpoints)
    history: list[dict[str, float]] = []
    start = 0
    if checkpointer.latest_step() is not None:
        restored = checkpointer.restore_latest({"params": params, "opt_state": opt_state, "history": []})
        params, opt_state, history = restored["params"], restored["opt_state"], list(restored["history"])
        start = int(checkpointer.latest_step())
        log(f"{run.title}: resuming from step {start}")

    online = run.teacher.config if teacher_params is not None else None
    flops_per_position = train_flops_per_token(run.student, train_batches.seq_len, online)
    clock = Throughput()
    last_val = None
    pending: list[tuple[int, Any, Any]] = []  # steps the devices computed whose metrics are not fetched yet
    progress = tqdm(desc=f"train {run.title}", initial=start, total=training.steps)
    inputs = StepBatches(
        train_batches, start, training.steps, training.batch_size, training.seed, training.grad_accum,
        place.batch(), depth=training.prefetch,
    )  # fmt: skip
    for item in inputs:
        step = item.step
        params, opt_state, terms, grad_norm = step_fn(
            params, opt_state, teacher_params, item.arrays, place.scalar(step)
        )
        pending.append((step, terms, grad_norm))
        clock.add(item.tokens, item.positions, first=step == start, ready=terms)
        progress.update(1)
        report_progress((step + 1) / training.steps)
        done = step + 1 == training.steps
        evaluate_now = (step + 1) % training.eval_every == 0 or done
        checkpoint_now = (step + 1) % training.checkpoint_every == 0 or done
        if not (evaluate_now or checkpoint_now or (step + 1) % training.log_every == 0):
            continue  # no host sync: the next step is dispatched while this one runs
        records = _fetch(pending, lr_at, clock.tokens_per_second())
        pending.clear()
        bad = next((r for r in records if not all(np.isfinite(r[k]) for k in (*TERMS, "grad_norm"))), None)
        if bad is not None:
            progress.close()
            checkpointer.close()
            raise GemstillError(
                f"{run.title}: loss became {bad['loss']} at step {bad['step']} (grad norm {bad['grad_norm']}); "
                f"the last good checkpoint (step {checkpointer.latest_step()}) is kept; lower "
                f"{run.learning_rate_key} or check the data"
            )
        history.extend(records)
        record = history[-1]
        if evaluate_now:
            last_val = evaluate_objective(
                run, eval_loss, params, teacher_params, val_batches, training.eval_batches, training.batch_size, place
            )
            record.update({f"val_{name}": value for name, value in last_val.items()})
        progress.set_postfix(loss=f"{record['loss']:.4f}")
        log(
            f"{run.title}: step {step + 1}/{training.steps} loss {record['loss']:.4f} "
            + (f"(distill {record['distill']:.4f}, ce {record['cross_entropy']:.4f}) " if run.cache_dir else "")
            + f"grad_norm {record['grad_norm']:.3f} "
            f"lr {record['lr']:.2e} {record['tokens_per_second']:.0f} tok/s"
        )
        if checkpoint_now:
            metrics = {"val_loss": record["val_loss"]} if "val_loss" in record else None
            checkpointer.save(step + 1, {"params": params, "opt_state": opt_state, "history": history}, metrics)
            if persist is not None:
                checkpointer.wait()  # a checkpoint is mirrored only once it is whole
                persist(out_dir / "checkpoints")
            if distributed.is_leader():
                _write_metrics(out_dir, history, run.title)
    progress.close()
    speed = clock.summary(flops_per_position, run.title, log)
    checkpointer.wait()
    chosen = checkpointer.best_step() or training.steps
    if chosen != training.steps:  # later stages (quantize, QAT, evaluate, export) all read out_dir/model
        params = checkpointer.restore(chosen, {"params": params, "opt_state": opt_state, "history": []})["params"]
        log(f"{run.title}: step {chosen} has the lowest validation loss; the model is that checkpoint")
    checkpointer.close()
    record = next(r for r in history if r["step"] == chosen)
    chosen_val = {name: record.get(f"val_{name}", float("nan")) for name in TERMS}
    host_params = host_copy(student_params(params))  # every process takes part in gathering sharded arrays
    if distributed.is_leader():
        save_native(out_dir / "model", run.student, host_params, tokenizer_model)
        _write_metrics(out_dir, history, run.title)
    return {
        "steps": training.steps,
        "final_train_loss": history[-1]["loss"],
        **{f"validation_{name}": value for name, value in chosen_val.items()},  # of the model written
        "model_step": chosen,
        **speed,
        "student_parameters": int(sum(np.prod(np.shape(v)) for v in student_params(params).values())),
    }


def host_copy(tree: Any) -> Any:
    """The values of a tree of (possibly global, sharded) arrays as numpy arrays, in every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _fetch(pending: list[tuple[int, Any, Any]], lr_at: Callable[[int], Any], tokens_per_second: float) -> list[dict]:
    """The pending steps' records, fetched from the devices in one transfer."""
    fetched = jax.device_get([(terms, norm) for _, terms, norm in pending])
    return [
        {
            "step": step + 1,
            **{name: float(value) for name, value in terms.items()},
            "grad_norm": float(norm),
            "lr": float(lr_at(step)),
            "tokens_per_second": tokens_per_second,
        }
        for (step, _, _), (terms, norm) in zip(pending, fetched, strict=True)
    ]


def _write_metrics(out_dir: Path, history: list[dict[str, float]], title: str) -> None:
    atomic_write_bytes(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history).encode())
    save_loss_curve(out_dir / "loss_curve.png", history, title=f"{title} training loss")
