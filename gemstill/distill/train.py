"""Training a student: the distillation objective (or plain cross-entropy for the baseline), one jitted step.

Exact resume: the rows of step s and every random draw in it (layer dropout) are functions of (seed, s) alone,
and checkpoints hold parameters, optimizer state and the step, so a run killed at any moment and resumed from
its latest checkpoint replays the same steps and ends with the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from gemstill.checkpoints.native import save_native
from gemstill.config import Gemma3Config
from gemstill.distill.checkpointing import TrainCheckpointer
from gemstill.distill.config import DistillConfig, TrainingConfig, schedule_value
from gemstill.distill.flops import peak_flops, train_flops_per_token
from gemstill.distill.input_pipeline import Batches, StepBatches
from gemstill.distill.losses import TeacherTargets, attention_loss, hidden_loss, logit_loss
from gemstill.distill.optim import is_frozen, learning_rate_schedule, make_optimizer
from gemstill.distill.sharding import optimizer_state_shardings, param_specs, shard_tree, shardings_for
from gemstill.errors import GemstillError
from gemstill.fsutil import atomic_write_bytes
from gemstill.kernels.lm_head import head_stats_dispatch
from gemstill.model import build_model
from gemstill.params import ParamBinder
from gemstill.plots import save_loss_curve
from gemstill.quant import fake_quant_params

_TERMS = ("loss", "distill", "cross_entropy", "hidden", "attention")


@dataclasses.dataclass(frozen=True)
class Teacher:
    """What training needs of the teacher: its config and (online mode) its parameters."""

    config: Gemma3Config
    params: Mapping[str, jax.Array] | None  # None: logits come from the cache only
    cache_dir: Path | None  # None: no logit targets (the cross-entropy baseline)
    cache_temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class FakeQuant:
    """Quantization-aware training: the student's forward pass sees its weights fake-quantized in `fmt`."""

    fmt: str  # int8, q8_0 or q4_0 (gemstill.quant)
    embedding: bool  # also the tied embedding / LM head


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything fixed about one training run."""

    student: Gemma3Config
    init_params: Mapping[str, jax.Array]
    pairs: tuple[tuple[int, int], ...]  # (student layer, teacher layer) for the intermediate terms
    objective: DistillConfig
    training: TrainingConfig
    teacher: Teacher
    title: str = "student"
    fake_quant: FakeQuant | None = None  # QAT: train through the quantizer (straight-through gradients)


def layer_drop_scales(rate: float, layers: int, key: jax.Array) -> jax.Array:
    """Progressive layer dropout: layer l is skipped with probability rate * (l + 1) / layers (deeper layers drop
    more), and a kept layer's residual update is scaled by 1 / keep probability."""
    rates = rate * (jnp.arange(layers) + 1) / layers
    keep = jax.random.uniform(key, (layers,)) >= rates
    return jnp.where(keep, 1.0 / (1.0 - rates), 0.0)


def _needs_projection(run: Run) -> bool:
    return run.objective.hidden.weight > 0 and run.student.embed_dim != run.teacher.config.embed_dim


PROJECTION = "projections."  # name prefix of the learned hidden-state projections among the trainable arrays


def initial_params(run: Run) -> dict[str, jax.Array]:
    """Trainable arrays, flat: the student's parameters, plus "projections.{layer}" [Ds, Dt] per mapped layer when
    the student and teacher widths differ."""
    params = {name: jnp.array(value, copy=True) for name, value in run.init_params.items()}  # the step donates them
    if run.fake_quant is not None:  # frozen weights never move: put them on the grid once, not in every step
        frozen = {k: v for k, v in params.items() if is_frozen(k, run.training.freeze)}
        params.update(fake_quant_params(run.student, frozen, run.fake_quant.fmt, run.fake_quant.embedding))
    if _needs_projection(run):
        ds, dt = run.student.embed_dim, run.teacher.config.embed_dim
        key = jax.random.key(run.training.seed + 7)
        for s, _ in run.pairs:
            params[f"{PROJECTION}{s}"] = jax.random.normal(jax.random.fold_in(key, s), (ds, dt), jnp.float32) * ds**-0.5
    return params


def student_params(params: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {name: value for name, value in params.items() if not name.startswith(PROJECTION)}


def _activations(model, micro: Mapping[str, jax.Array], hidden_pairs, attention_layers, **training_knobs):
    """A forward pass over a packed micro-batch up to the final hidden state (the LM head runs chunked later),
    with every block's output when hidden pairs are mapped and the attention maps of `attention_layers`."""
    segments = micro["segment_ids"]
    return model(
        micro["tokens"],
        micro["positions"],
        mask=segments > 0,
        segment_ids=segments,
        return_logits=False,
        return_hidden=bool(hidden_pairs),
        attention_prob_layers=attention_layers,
        **training_knobs,
    )


def make_loss(run: Run) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """loss(params, teacher_params, micro, step, key, total_weight) -> (scalar, terms) for one micro-batch."""
    student_bind = ParamBinder(build_model(run.student, seed=0))
    teacher_bind = ParamBinder(build_model(run.teacher.config, seed=0)) if run.teacher.params is not None else None
    obj, training = run.objective, run.training
    steps = training.steps
    hidden_pairs = run.pairs if obj.hidden.weight > 0 else ()
    attn_pairs = run.pairs if obj.attention.weight > 0 else ()
    use_cache = run.teacher.cache_dir is not None

    def loss(params, teacher_params, micro, step, key, total_weight, train: bool = True):
        frozen = training.freeze
        params = {k: jax.lax.stop_gradient(v) if is_frozen(k, frozen) else v for k, v in params.items()}
        arrays = student_params(params)
        if run.fake_quant is not None:  # frozen weights were put on the grid by initial_params
            trained = {k: v for k, v in arrays.items() if not is_frozen(k, frozen)}
            arrays.update(fake_quant_params(run.student, trained, run.fake_quant.fmt, run.fake_quant.embedding))
        student = student_bind(arrays)
        real = micro["segment_ids"] > 0
        out = _activations(
            student,
            micro,
            hidden_pairs,
            tuple(s for s, _ in attn_pairs),
            layer_scale=layer_drop_scales(training.layer_drop, run.student.num_layers, key)
            if train and training.layer_drop > 0
            else None,
            remat=training.remat if train else None,
            attention_impl=training.kernels,
        )
        batch, length, dim = out.final_hidden.shape
        hidden = out.final_hidden.reshape(batch * length, dim)
        if use_cache:
            targets = TeacherTargets(
                micro["ids"].reshape(batch * length, -1),
                micro["logprobs"].reshape(batch * length, -1),
                micro["tail_mass"].reshape(-1),
            )
        else:
            zeros = jnp.zeros((batch * length, 1), jnp.int32)
            targets = TeacherTargets(zeros, zeros.astype(jnp.float32), jnp.zeros(batch * length, jnp.float32))
        temperature = jnp.asarray(schedule_value(obj.temperature, step, steps), jnp.float32)
        alpha = jnp.asarray(schedule_value(obj.alpha, step, steps), jnp.float32) if use_cache else 0.0
        stats = head_stats_dispatch(
            hidden,
            student.embedding[...].astype(hidden.dtype),
            targets.ids,
            micro["labels"].reshape(-1),
            temperature=temperature,
            softcap=run.student.final_logit_softcap,
            chunk=training.loss_chunk,
            implementation=training.kernels,
        )
        terms = logit_loss(
            stats,
            targets,
            kind=obj.divergence,
            tail=obj.tail,
            alpha=alpha,
            beta=jnp.asarray(schedule_value(obj.beta, step, steps), jnp.float32),
            temperature=temperature,
            cache_temperature=run.teacher.cache_temperature,
        )
        weights = micro["weights"].reshape(-1)
        parts = {
            "loss": (terms.total * weights).sum() / total_weight,
            "distill": (terms.distill * weights).sum() / total_weight if use_cache else jnp.zeros(()),
            "cross_entropy": (terms.cross_entropy * weights).sum() / total_weight,
            "hidden": jnp.zeros(()),
            "attention": jnp.zeros(()),
        }
        if teacher_bind is not None and (hidden_pairs or attn_pairs):
            teacher = teacher_bind(jax.lax.stop_gradient(teacher_params))
            teacher_out = _activations(teacher, micro, hidden_pairs, tuple(t for _, t in attn_pairs))
            share = micro["weights"].sum() / total_weight  # this micro-batch's share of the step's tokens
            for s, t in hidden_pairs:
                projection = params.get(f"{PROJECTION}{s}")
                term = hidden_loss(
                    out.hidden_states[s + 1], teacher_out.hidden_states[t + 1], projection, real, obj.hidden.kind
                )
                parts["hidden"] += share * term / len(hidden_pairs)
            for s, t in attn_pairs:
                term = attention_loss(out.attention_probs[s], teacher_out.attention_probs[t], real)
                parts["attention"] += share * term / len(attn_pairs)
            parts["loss"] += obj.hidden.weight * parts["hidden"] + obj.attention.weight * parts["attention"]
        return parts["loss"], parts

    return loss


def make_train_step(run: Run, optimizer: optax.GradientTransformation, out_shardings: Any = None) -> Callable[..., Any]:
    """step(params, opt_state, teacher_params, batch, step) -> (params, opt_state, terms, grad_norm).

    batch leaves are [grad_accum, micro_batch, L]; gradients are summed over micro-batches in a scan (each
    micro-batch's loss is already divided by the whole step's token count, so the sum is the step's mean).
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
        zero_terms = {name: jnp.zeros(()) for name in _TERMS}
        accum = batch["weights"].shape[0]
        (grads, terms), _ = jax.lax.scan(micro_step, (zero_grads, zero_terms), (jnp.arange(accum), batch))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, terms, optax.tree.norm(grads)

    if out_shardings is None:
        return jax.jit(step_fn, donate_argnums=(0, 1))
    return jax.jit(step_fn, donate_argnums=(0, 1), out_shardings=out_shardings)


class Placement:
    """Where arrays live: one device, or sharded over a (data, fsdp, tensor) mesh by gemstill.distill.sharding."""

    def __init__(self, mesh: Mesh | None, training: TrainingConfig):
        self.mesh = mesh
        if mesh is not None:
            micro = training.batch_size // training.grad_accum
            ways = mesh.shape["data"] * mesh.shape["fsdp"]
            if micro % ways:
                raise GemstillError(
                    f"micro-batch of {micro} sequences cannot be split over data x fsdp = {ways} devices; make "
                    "training.batch_size / training.grad_accum a multiple of it"
                )

    def params(self, params: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], Any]:
        if self.mesh is None:
            return params, None
        shardings = shardings_for(param_specs({k: v.shape for k, v in params.items()}, self.mesh), self.mesh)
        return shard_tree(params, shardings), shardings

    def optimizer_state(self, optimizer: optax.GradientTransformation, params: dict[str, jax.Array], shardings: Any):
        if self.mesh is None:
            return optimizer.init(params), None
        shapes = {k: v.shape for k, v in params.items()}
        state_shardings = optimizer_state_shardings(
            jax.eval_shape(optimizer.init, params), shardings, self.mesh, shapes
        )
        return jax.jit(optimizer.init, out_shardings=state_shardings)(params), state_shardings

    def batch(self) -> NamedSharding | None:
        return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec(None, ("data", "fsdp")))

    def replicated(self) -> NamedSharding | None:
        return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())


def evaluate_objective(
    run: Run, loss: Callable[..., Any], params, teacher_params, batches: Batches, count: int, batch_size: int
) -> dict:
    """The training objective's terms on the first `count` batches of a split, without layer dropout; `loss` is
    jax.jit(make_loss(run), static_argnames="train"), compiled once per run by the caller."""
    totals = {name: 0.0 for name in _TERMS}
    seen = 0
    for start in range(0, min(count * batch_size, batches.rows), batch_size):
        rows = np.arange(start, min(start + batch_size, batches.rows))
        batch = {k: jnp.asarray(v) for k, v in batches.get(rows).items()}
        weight = float(batch["weights"].sum())
        if weight == 0:
            continue
        _, parts = loss(params, teacher_params, batch, run.training.steps - 1, jax.random.key(0), weight, train=False)
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
    metrics.jsonl and loss_curve.png. With a mesh, parameters, optimizer state and batches are sharded on it.

    persist: called with the checkpoint directory once each checkpoint is written, to mirror it to the store.
    report_progress: called with the fraction of steps done after each step.
    """
    training = run.training
    optimizer = make_optimizer(training.optimizer, training.steps, training.freeze)
    lr_at = learning_rate_schedule(training.optimizer, training.steps)
    train_batches = Batches(data_dir, run.teacher.cache_dir, "train")
    val_batches = Batches(data_dir, run.teacher.cache_dir, "validation")
    for entry in training.freeze:
        if not any(is_frozen(name, [entry]) for name in run.init_params):
            raise GemstillError(
                f"training.freeze: {entry!r} matches no student parameter; use a name such as 'embedding' or 'layers.0'"
            )
    place = Placement(mesh, training)
    params, param_shardings = place.params(initial_params(run))
    opt_state, state_shardings = place.optimizer_state(optimizer, params, param_shardings)
    teacher_params = run.teacher.params if (run.objective.hidden.weight or run.objective.attention.weight) else None
    if teacher_params is not None:
        teacher_params = place.params(dict(teacher_params))[0]
    out_shardings = None
    if mesh is not None:
        scalar = place.replicated()
        out_shardings = (param_shardings, state_shardings, {name: scalar for name in _TERMS}, scalar)
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
        params, opt_state, terms, grad_norm = step_fn(params, opt_state, teacher_params, item.arrays, jnp.asarray(step))
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
        bad = next((r for r in records if not all(np.isfinite(r[k]) for k in (*_TERMS, "grad_norm"))), None)
        if bad is not None:
            progress.close()
            checkpointer.close()
            raise GemstillError(
                f"{run.title}: loss became {bad['loss']} at step {bad['step']} (grad norm {bad['grad_norm']}); "
                f"the last good checkpoint (step {checkpointer.latest_step()}) is kept; lower "
                "training.optimizer.learning_rate or check the data"
            )
        history.extend(records)
        record = history[-1]
        if evaluate_now:
            last_val = evaluate_objective(
                run, eval_loss, params, teacher_params, val_batches, training.eval_batches, training.batch_size
            )
            record.update({f"val_{name}": value for name, value in last_val.items()})
        progress.set_postfix(loss=f"{record['loss']:.4f}")
        log(
            f"{run.title}: step {step + 1}/{training.steps} loss {record['loss']:.4f} "
            f"(distill {record['distill']:.4f}, ce {record['cross_entropy']:.4f}) grad_norm {record['grad_norm']:.3f} "
            f"lr {record['lr']:.2e} {record['tokens_per_second']:.0f} tok/s"
        )
        if checkpoint_now:
            metrics = {"val_loss": record["val_loss"]} if "val_loss" in record else None
            checkpointer.save(step + 1, {"params": params, "opt_state": opt_state, "history": history}, metrics)
            if persist is not None:
                checkpointer.wait()  # a checkpoint is mirrored only once it is whole
                persist(out_dir / "checkpoints")
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
    chosen_val = {name: record.get(f"val_{name}", float("nan")) for name in _TERMS}
    save_native(out_dir / "model", run.student, jax.device_get(student_params(params)), tokenizer_model)
    _write_metrics(out_dir, history, run.title)
    return {
        "steps": training.steps,
        "final_train_loss": history[-1]["loss"],
        **{f"validation_{name}": value for name, value in chosen_val.items()},  # of the model written
        "model_step": chosen,
        **speed,
        "student_parameters": int(sum(np.prod(np.shape(v)) for v in student_params(params).values())),
    }


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


class Throughput:
    """Loss tokens and token positions per second, timed from the end of the run's first step (its compilation
    is not throughput), and the model FLOPs utilization they imply on this platform's peak."""

    def __init__(self) -> None:
        self.tokens = self.positions = 0
        self.began: float | None = None

    def add(self, tokens: int, positions: int, first: bool, ready: Any) -> None:
        if first:  # the one sync outside the sync points: wait for the compiled first step, then start the clock
            jax.block_until_ready(ready)
            self.began = time.perf_counter()
            return
        self.tokens += tokens
        self.positions += positions

    def seconds(self) -> float:
        return time.perf_counter() - self.began if self.began is not None else 0.0

    def tokens_per_second(self) -> float:
        seconds = self.seconds()
        return self.tokens / seconds if seconds > 0 else 0.0

    def summary(self, flops_per_position: float, title: str, log: Callable[[str], None]) -> dict[str, Any]:
        seconds = self.seconds()
        if seconds <= 0 or not self.positions:
            return {"tokens_per_second": None, "model_tflops_per_second": None, "mfu": None}
        achieved = flops_per_position * self.positions / seconds
        devices = jax.devices()
        peak = peak_flops(devices[0].device_kind)
        mfu = achieved / (peak * len(devices)) if peak else None
        log(
            f"{title}: {self.tokens / seconds:.0f} loss tokens/s, {achieved / 1e12:.3f} model TFLOP/s"
            + (f", MFU {mfu:.1%}" if mfu is not None else f" (no peak known for {devices[0].device_kind}: no MFU)")
        )
        return {"tokens_per_second": self.tokens / seconds, "model_tflops_per_second": achieved / 1e12, "mfu": mfu}


def _write_metrics(out_dir: Path, history: list[dict[str, float]], title: str) -> None:
    atomic_write_bytes(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history).encode())
    save_loss_curve(out_dir / "loss_curve.png", history, title=f"{title} training loss")
