"""A training step of the `tiny` profile's student with the Pallas kernels (attention and the fused LM-head loss)
run by the Pallas interpreter matches the XLA path: loss to 1e-5 relative, gradients to 1e-4."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from test_train import dirs  # noqa: F401  (the packed data + teacher cache fixture)
from train_driver import build_run

from gemstill.distill.input_pipeline import Batches
from gemstill.distill.objective import make_loss
from gemstill.distill.run import initial_params
from gemstill.model import build_model
from gemstill.params import to_flat
from gemstill.pipeline.profile import load_profile


def test_tiny_training_step_with_interpreted_kernels_matches_xla(dirs):  # noqa: F811
    data, cache = dirs
    profile, _ = load_profile("tiny")
    student = profile.student.gemma_config(profile.teacher.scratch.gemma_config())
    batch = {k: jax.numpy.asarray(v) for k, v in Batches(data, cache, "train").get(np.arange(2)).items()}
    weight = float(batch["weights"].sum())
    results = {}
    for kernels in ("xla", "interpret"):
        run = build_run(cache, kernels=kernels, loss_chunk=64)
        run = dataclasses.replace(
            run, student=student, init_params=to_flat(build_model(student, seed=3)), objective=profile.distill
        )
        loss = make_loss(run)
        value, grads = jax.value_and_grad(lambda p, loss=loss: loss(p, None, batch, 0, jax.random.key(0), weight)[0])(
            initial_params(run)
        )
        results[kernels] = (float(value), grads)
    (reference, ref_grads), (interpreted, grads) = results["xla"], results["interpret"]
    assert np.isfinite(reference)
    np.testing.assert_allclose(interpreted, reference, rtol=1e-5)
    for name, grad in ref_grads.items():
        scale = float(np.abs(grad).max()) or 1.0
        np.testing.assert_allclose(grads[name] / scale, grad / scale, atol=1e-4, err_msg=name)
