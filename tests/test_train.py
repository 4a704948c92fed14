"""Student training: outputs, gradient accumulation, exact resume after SIGKILL, NaN stop, online-teacher terms,
the speed/memory knobs, and sharded training on 8 simulated CPU devices (same result, resume on another mesh)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_teacher_cache import CONFIG, packed_split, train_tokenizer
from train_driver import TEACHER, build_run

from gemstill.checkpoints.native import load_native
from gemstill.data.format import write_split
from gemstill.distill.input_pipeline import Batches
from gemstill.distill.objective import make_loss
from gemstill.distill.run import initial_params
from gemstill.distill.step import make_train_step
from gemstill.distill.train import train
from gemstill.errors import GemstillError
from gemstill.loading import LoadedModel
from gemstill.model import build_model
from gemstill.teacher_cache.writer import build_teacher_cache
from gemstill.tokenizer import Tokenizer

DRIVER = Path(__file__).parent / "train_driver.py"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Packed test data and the top-16 cache of the driver's teacher over it."""
    proto = train_tokenizer(300)
    data = tmp_path_factory.mktemp("data")
    (data / "tokenizer.model").write_bytes(proto)
    for split, rows, seed in (("train", 24, 1), ("validation", 8, 2)):
        write_split(data, split, **packed_split(Tokenizer(proto), rows, seed))
    cache = tmp_path_factory.mktemp("cache")
    teacher = LoadedModel("test", TEACHER, build_model(TEACHER, seed=0), Tokenizer(proto))
    build_teacher_cache(CONFIG, data, teacher, cache, log=lambda _: None)
    return data, cache


def _params(out: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in load_native(out / "model")[1].items()}


def test_training_writes_model_metrics_and_curve(dirs, tmp_path):
    data, cache = dirs
    metrics = train(build_run(cache), data, tmp_path, None, log=lambda _: None)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 7))
    assert {"loss", "distill", "cross_entropy", "grad_norm", "lr", "tokens_per_second"} <= set(history[0])
    assert "val_loss" in history[2] and "val_loss" in history[5] and "val_loss" not in history[0]
    assert history[-1]["loss"] < history[0]["loss"]
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(_params(tmp_path)) == set(build_run(cache).init_params)
    assert metrics["steps"] == 6 and np.isfinite(metrics["validation_loss"])


def test_prefetched_input_gives_bit_identical_losses_and_parameters(dirs, tmp_path):
    """The background thread reads and places the same rows in the same order: nothing changes but the timing.
    Metrics leave the device only every log_every steps (3 here, of 7), and still every step has its record."""
    data, cache = dirs
    histories, params = [], []
    for depth in (0, 3):
        out = tmp_path / f"prefetch-{depth}"
        metrics = train(build_run(cache, steps=7, prefetch=depth, log_every=3), data, out, None, log=lambda _: None)
        histories.append([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
        params.append(_params(out))
        assert metrics["tokens_per_second"] > 0 and metrics["model_tflops_per_second"] > 0
        assert metrics["mfu"] is None  # no peak is known for a CPU
    terms = ("loss", "distill", "cross_entropy", "grad_norm", "val_loss")
    assert [[h.get(k) for k in terms] for h in histories[0]] == [[h.get(k) for k in terms] for h in histories[1]]
    assert [h["step"] for h in histories[1]] == list(range(1, 8))
    for name in params[0]:
        np.testing.assert_array_equal(params[0][name], params[1][name])


def test_the_model_written_is_the_best_validated_checkpoint(dirs, tmp_path, monkeypatch):
    """Validation says step 6 of 9 is best: out_dir/model (what quantize, QAT, evaluate and export read) holds
    step 6's parameters, not the last step's, and the metrics report step 6's validation terms."""
    import gemstill.distill.train as train_module
    from gemstill.distill.checkpointing import TrainCheckpointer

    data, cache = dirs
    losses = iter([3.0, 1.0, 2.0])  # at steps 3, 6 and 9

    def scripted(*args, **kwargs):
        value = next(losses)
        return {name: value for name in ("loss", "distill", "cross_entropy", "hidden", "attention")}

    monkeypatch.setattr(train_module, "evaluate_objective", scripted)
    run = build_run(cache, steps=9, eval_every=3, checkpoint_every=3, keep_checkpoints=1)
    metrics = train(run, data, tmp_path, None, log=lambda _: None)
    assert metrics["model_step"] == 6 and metrics["validation_loss"] == 1.0
    checkpoints = TrainCheckpointer(tmp_path / "checkpoints", keep=1)
    assert checkpoints.all_steps() == [6, 9]  # the best survives pruning beside the latest
    from gemstill.distill.optim import make_optimizer

    params = initial_params(run)
    optimizer = make_optimizer(run.training.optimizer, run.training.steps, run.training.freeze)
    target = {"params": params, "opt_state": optimizer.init(params), "history": []}
    saved = {step: checkpoints.restore(step, target)["params"] for step in (6, 9)}
    checkpoints.close()
    written = _params(tmp_path)
    for name, value in written.items():
        np.testing.assert_array_equal(value, np.asarray(saved[6][name]))
    assert any(not np.array_equal(written[name], np.asarray(saved[9][name])) for name in written)


def micro_batches(host: dict[str, np.ndarray], accum: int) -> dict[str, jnp.ndarray]:
    return {name: jnp.asarray(v.reshape(accum, v.shape[0] // accum, *v.shape[1:])) for name, v in host.items()}


def test_gradient_accumulation_equals_the_full_batch(dirs):
    """One SGD(lr=1) step: the update is the gradient, so accumulating over 2 micro-batches must give the same."""
    data, cache = dirs
    batches = Batches(data, cache, "train")
    host = batches.get(np.arange(4))
    results = []
    for accum in (1, 2):
        run = build_run(cache, batch_size=4, grad_accum=accum)
        step = make_train_step(run, optax.sgd(1.0))
        params = initial_params(run)
        new, _, terms, _ = step(
            dict(params), optax.sgd(1.0).init(params), None, micro_batches(host, accum), jnp.asarray(0)
        )
        results.append((new, terms))
    (full, full_terms), (accumulated, acc_terms) = results
    np.testing.assert_allclose(acc_terms["loss"], full_terms["loss"], rtol=1e-5)
    for name in full:
        np.testing.assert_allclose(accumulated[name], full[name], rtol=1e-4, atol=1e-6, err_msg=name)


def _driver(data: Path, cache: Path, out: Path, *args: str, devices: int | None = None) -> subprocess.Popen:
    extra = ["--devices", str(devices)] if devices else []
    return subprocess.Popen(
        [sys.executable, str(DRIVER), str(data), str(cache), str(out), *extra, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def _steps_saved(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


@pytest.mark.parametrize("mode", [[], ["--pretrain"]], ids=["student", "teacher_pretraining"])
def test_sigkill_then_resume_ends_with_identical_parameters(dirs, tmp_path, mode):
    """A student's distillation, and a from-scratch teacher's pretraining through the same loop."""
    data, cache = dirs
    settings = ["--set", "steps=10", "--set", "checkpoint_every=2", "--set", "layer_drop=0.3", *mode]
    reference = _driver(data, cache, tmp_path / "reference", *settings)
    assert reference.wait(timeout=600) == 0, reference.stdout.read()[-3000:]

    killed = _driver(data, cache, tmp_path / "killed", *settings)
    deadline = time.time() + 600
    while max(_steps_saved(tmp_path / "killed"), default=0) < 4 and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    saved = _steps_saved(tmp_path / "killed")
    assert saved and max(saved) < 10, f"the kill came too late to test resuming: {saved}"
    assert not (tmp_path / "killed" / "model").exists()

    resumed = _driver(data, cache, tmp_path / "killed", *settings)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "resuming from step" in output
    want, got = _params(tmp_path / "reference"), _params(tmp_path / "killed")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    history = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 11))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(dirs, tmp_path):
    data, cache = dirs
    run = build_run(cache, steps=20, checkpoint_every=1, optimizer={"learning_rate": 1e30, "warmup_steps": 0})
    with pytest.raises(GemstillError, match=r"loss became .* the last good checkpoint \(step \d+\) is kept") as caught:
        train(run, data, tmp_path, None, log=lambda _: None)
    bad_step = int(str(caught.value).split(" at step ")[1].split()[0])
    assert _steps_saved(tmp_path) and max(_steps_saved(tmp_path)) == bad_step - 1
    assert not (tmp_path / "model").exists()


def test_online_teacher_hidden_and_attention_terms_train_a_projection(dirs, tmp_path):
    data, cache = dirs
    objective = {
        "alpha": 0.5,
        "online_teacher": True,
        "hidden": {"weight": 1.0, "kind": "mse"},
        "attention": {"weight": 1.0},
    }
    run = build_run(cache, objective=objective, steps=3, checkpoint_every=3)
    narrow = run.student.replace(embed_dim=32, hidden_dim=64)
    from dataclasses import replace

    from gemstill.params import to_flat

    run = replace(run, student=narrow, init_params=to_flat(build_model(narrow, seed=1)))
    start = initial_params(run)
    assert start["projections.0"].shape == (32, TEACHER.embed_dim)
    train(run, data, tmp_path, None, log=lambda _: None)
    history = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(h["hidden"] > 0 and h["attention"] > 0 for h in history)
    assert history[-1]["loss"] > history[-1]["distill"] * 0.5  # the intermediate terms are part of the loss
    loss = make_loss(run)
    batch = {k: jnp.asarray(v) for k, v in Batches(data, cache, "train").get(np.arange(2)).items()}
    grads = jax.grad(lambda p: loss(p, run.teacher.params, batch, 0, jax.random.key(0), 10.0)[0])(start)
    assert float(jnp.abs(grads["projections.0"]).max()) > 0


@pytest.mark.parametrize(
    "knobs",
    [
        {"optimizer": {"name": "adafactor", "learning_rate": 1e-2}},
        {"layer_drop": 0.5, "remat": "block", "grad_accum": 2},
        {"remat": "dots", "loss_chunk": 16},
    ],
)
def test_training_knobs_run_and_stay_finite(dirs, tmp_path, knobs):
    data, cache = dirs
    metrics = train(build_run(cache, steps=3, checkpoint_every=3, **knobs), data, tmp_path, None, log=lambda _: None)
    assert np.isfinite(metrics["final_train_loss"]) and np.isfinite(metrics["validation_loss"])


def test_remat_and_bfloat16_compute(dirs):
    """Rematerialization changes memory, not values; bf16 compute (fp32 master weights) stays close to fp32."""
    data, cache = dirs
    batch = {k: jnp.asarray(v) for k, v in Batches(data, cache, "train").get(np.arange(4)).items()}
    values = {}
    for name, run in {
        "plain": build_run(cache),
        "remat": build_run(cache, remat="block"),
        "bf16": build_run(cache),
    }.items():
        if name == "bf16":
            from dataclasses import replace

            run = replace(run, student=run.student.replace(dtype="bfloat16"))
        params = initial_params(run)
        value, grads = jax.value_and_grad(
            lambda p, run=run: make_loss(run)(p, None, batch, 0, jax.random.key(0), 50.0)[0]
        )(params)
        values[name] = (value, grads)
        assert all(g.dtype == jnp.float32 for g in grads.values())
    np.testing.assert_allclose(values["remat"][0], values["plain"][0], rtol=1e-6)
    np.testing.assert_allclose(values["bf16"][0], values["plain"][0], rtol=3e-2)


def test_sharded_training_on_8_devices_matches_and_resumes_on_another_mesh(dirs, tmp_path):
    """Mesh (2,2,2) vs one device: same parameters; then a run checkpointed under (2,2,2) resumes under (1,4,2)."""
    data, cache = dirs
    settings = ["--set", "steps=4", "--set", "checkpoint_every=2", "--set", "batch_size=8"]
    single = _driver(data, cache, tmp_path / "single", *settings)
    assert single.wait(timeout=600) == 0, single.stdout.read()[-3000:]
    sharded = _driver(data, cache, tmp_path / "sharded", *settings, "--mesh", "2,2,2", devices=8)
    assert sharded.wait(timeout=600) == 0, sharded.stdout.read()[-3000:]
    want = _params(tmp_path / "single")
    for name, value in _params(tmp_path / "sharded").items():
        np.testing.assert_allclose(value, want[name], rtol=1e-4, atol=2e-5, err_msg=name)

    # simulate a kill after step 2 of the sharded run, then resume on a differently shaped slice
    shutil.rmtree(tmp_path / "sharded" / "checkpoints" / "4")
    shutil.rmtree(tmp_path / "sharded" / "model")
    resumed = _driver(data, cache, tmp_path / "sharded", *settings, "--mesh", "1,4,2", devices=8)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "resuming from step 2" in output
    for name, value in _params(tmp_path / "sharded").items():
        np.testing.assert_allclose(value, want[name], rtol=1e-4, atol=2e-5, err_msg=name)


def test_pretraining_is_cross_entropy_from_the_random_init(dirs, tmp_path):
    """Step 1's loss of a teacher pretrained through train() (chunked LM head, no teacher) equals the masked
    next-token NLL of its seed-0 init from full logits and log_softmax, on step 0's rows; and pretraining learns."""
    from train_driver import pretrain_settings

    from gemstill.pretrain import pretrain

    data, _ = dirs
    settings = pretrain_settings(steps=8, optimizer={"learning_rate": 1e-2, "warmup_steps": 0})
    metrics = pretrain(TEACHER, settings, data, tmp_path, log=lambda _: None)
    history = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (tmp_path / "model").is_dir() and (tmp_path / "loss_curve.png").is_file()

    model = build_model(TEACHER, seed=settings.seed)
    batches = Batches(data, None, "train")
    host = batches.get(batches.step_rows(0, settings.batch_size, settings.seed))
    tokens, positions, segments = (jnp.asarray(host[k]) for k in ("tokens", "positions", "segment_ids"))
    logits = model(tokens, positions, mask=segments > 0, segment_ids=segments).logits
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = np.take_along_axis(np.asarray(logprobs), host["labels"][..., None], axis=-1)[..., 0]
    reference = -(picked * host["weights"]).sum() / host["weights"].sum()
    np.testing.assert_allclose(history[0]["loss"], reference, rtol=1e-5)
    assert history[0]["distill"] == 0.0 and history[0]["loss"] == history[0]["cross_entropy"]
    assert history[-1]["loss"] < history[0]["loss"] - 0.5
    assert np.isclose(metrics["validation_perplexity"], np.exp(metrics["validation_loss"]))
    assert metrics["parameters"] == sum(int(np.prod(v.shape)) for v in _params(tmp_path).values())


def test_old_pretraining_keys_name_their_new_place(tmp_path):
    from gemstill.pipeline.profile import load_profile

    with pytest.raises(
        GemstillError,
        match=r"teacher.scratch.training.learning_rate is now "
        r"teacher.scratch.training.optimizer.learning_rate",
    ):
        load_profile("tiny", {"teacher.scratch.training.learning_rate": 0.01})


def test_one_compile_of_the_step_and_of_the_validation_loss_per_run(dirs, tmp_path):
    """Validating twice, with a short last validation batch (8 rows in batches of 3): the step and the validation
    loss are each compiled once (jax.log_compiles), and the padded batch scores the same as the rows alone."""
    import logging

    data, cache = dirs
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            run = build_run(cache, steps=4, batch_size=3, eval_every=2, checkpoint_every=4, eval_batches=3)
            train(run, data, tmp_path, None, log=lambda _: None)
    finally:
        logger.removeHandler(handler)
    compiled = [m.split(" with ")[0] for m in messages if m.startswith("Compiling jit(")]
    assert compiled.count("Compiling jit(step_fn)") == 1 and compiled.count("Compiling jit(loss)") == 1, compiled

    from gemstill.distill.train import evaluate_objective

    loss = jax.jit(make_loss(run), static_argnames="train")
    params = initial_params(run)
    validation = Batches(data, cache, "validation")
    padded = evaluate_objective(run, loss, params, None, validation, count=1, batch_size=10)  # 8 rows + 2 empty
    whole = evaluate_objective(run, loss, params, None, validation, count=1, batch_size=8)
    for name, value in whole.items():
        np.testing.assert_allclose(padded[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
