"""Sharding over a (data, fsdp, tensor) mesh and training checkpoints that resume on a different mesh.

The multi-device checks need 8 CPU devices, which XLA only creates if told before jax starts, so they run in a
child process (this file run as a script with one check's name) and the rest of the suite keeps one device.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from eight_devices import report, run_in_child
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gemstill.config import Gemma3Config
from gemstill.distill.checkpointing import TrainCheckpointer
from gemstill.distill.sharding import (
    batch_sharding,
    make_mesh,
    optimizer_state_shardings,
    param_specs,
    shard_tree,
    shardings_for,
)
from gemstill.errors import GemstillError
from gemstill.model import build_model
from gemstill.params import ParamBinder, expected_shapes, to_flat

SMALL = Gemma3Config(
    num_layers=2,
    embed_dim=32,
    hidden_dim=64,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    sliding_window=8,
    vocab_size=128,
    max_context=64,
)

# expected per-device shard shape of each parameter kind under mesh (data=2, fsdp=2, tensor=2)
SHARD_SHAPES_222 = {
    "embedding": (64, 16),
    "final_norm.scale": (32,),
    "attn.q_proj": (16, 2, 8),
    "attn.k_proj": (16, 1, 8),
    "attn.v_proj": (16, 1, 8),
    "attn.o_proj": (2, 8, 16),
    "attn.q_norm.scale": (8,),
    "attn.k_norm.scale": (8,),
    "pre_attn_norm.scale": (32,),
    "post_attn_norm.scale": (32,),
    "pre_ffw_norm.scale": (32,),
    "post_ffw_norm.scale": (32,),
    "mlp.gate": (16, 32),
    "mlp.up": (16, 32),
    "mlp.down": (32, 16),
}


def _kind(name: str) -> str:
    return name if not name.startswith("layers.") else name.split(".", 2)[2]


def _shard_shapes(array: jax.Array) -> set[tuple[int, ...]]:
    return {tuple(s.data.shape) for s in array.addressable_shards}


# ---------------------------------------------------------------- checks run in the 8-device child process


def check_param_specs(_: Path) -> None:
    assert jax.device_count() == 8
    mesh = make_mesh(2, 2, 2)
    shapes = expected_shapes(SMALL)
    params = shard_tree(to_flat(build_model(SMALL, seed=0)), shardings_for(param_specs(shapes, mesh), mesh))
    assert set(params) == set(shapes)
    for name, array in params.items():
        assert _shard_shapes(array) == {SHARD_SHAPES_222[_kind(name)]}, name
    assert params["embedding"].sharding.spec == P("tensor", "fsdp")
    assert params["layers.1.attn.o_proj"].sharding.spec == P("tensor", None, "fsdp")
    assert params["layers.0.mlp.down"].sharding.spec == P("tensor", "fsdp")
    assert params["final_norm.scale"].sharding.is_fully_replicated

    # tensor=4: four query heads split, two KV heads cannot be and stay whole on the heads axis
    specs = param_specs(shapes, make_mesh(1, 2, 4))
    assert specs["layers.0.attn.q_proj"] == P("fsdp", "tensor", None)
    assert specs["layers.0.attn.k_proj"] == P("fsdp", None, None)
    assert specs["layers.0.attn.v_proj"] == P("fsdp", None, None)
    assert specs["layers.0.mlp.up"] == P("fsdp", "tensor")
    k_proj = jax.device_put(
        jnp.zeros(shapes["layers.0.attn.k_proj"]), NamedSharding(make_mesh(1, 2, 4), specs["layers.0.attn.k_proj"])
    )
    assert _shard_shapes(k_proj) == {(16, 2, 8)}

    # prefixed names follow the same rules; unknown names are replicated; D=30 is not divisible by fsdp=4
    odd = param_specs(
        {"student.layers.0.mlp.up": (32, 64), "projections.3": (32, 48), "student.embedding": (128, 30)},
        make_mesh(1, 4, 2),
    )
    assert odd == {
        "student.layers.0.mlp.up": P("fsdp", "tensor"),
        "projections.3": P(None, None),
        "student.embedding": P("tensor", None),
    }

    # optimizer state follows the parameters: Adam moments, injected hyperparameters, Adafactor factored stats
    param_shardings = shardings_for(param_specs(shapes, mesh), mesh)
    abstract = jax.eval_shape(lambda: params)
    adam = optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3))
    adam_shardings = optimizer_state_shardings(jax.eval_shape(adam.init, abstract), param_shardings, mesh, shapes)
    adam_state = shard_tree(adam.init(params), adam_shardings)
    inner = adam_state[1].inner_state[0]
    for name in shapes:
        assert inner.mu[name].sharding.spec == params[name].sharding.spec, name
        assert _shard_shapes(inner.nu[name]) == _shard_shapes(params[name]), name
    assert adam_state[1].hyperparams["learning_rate"].sharding.is_fully_replicated
    assert inner.count.sharding.is_fully_replicated
    # without param_shapes, a leaf of the parameter's rank reuses the parameter's sharding
    assert optimizer_state_shardings(jax.eval_shape(adam.init, abstract), param_shardings, mesh) == adam_shardings

    factor = optax.chain(optax.clip_by_global_norm(1.0), optax.adafactor(1e-3, min_dim_size_to_factor=8))
    factor_shardings = optimizer_state_shardings(jax.eval_shape(factor.init, abstract), param_shardings, mesh, shapes)
    factored = factor_shardings[1][0]  # chain(clip, adafactor's chain(scale_by_factored_rms, ...))
    assert type(factored).__name__ == "FactoredState"
    # Adafactor reduces over the largest axis for v_row and the second largest for v_col
    up = "layers.0.mlp.up"  # [D=32, F=64]: v_row [D] keeps fsdp, v_col [F] keeps tensor
    assert factored.v_row[up].spec == P("fsdp") and factored.v_col[up].spec == P("tensor")
    assert factored.v_row["embedding"].spec == P("fsdp") and factored.v_col["embedding"].spec == P("tensor")
    assert factored.v["layers.0.attn.q_norm.scale"].spec == P(None)  # unfactored 1-D: v mirrors the param
    factor_state = shard_tree(factor.init(params), factor_shardings)
    grads = jax.tree.map(jnp.ones_like, params)
    update = jax.jit(factor.update, out_shardings=(param_shardings, factor_shardings))
    _, new_state = update(grads, factor_state, params)
    assert jax.tree.all(jax.tree.map(lambda a, b: a.sharding == b.sharding, new_state, factor_state))
    assert np.isfinite(float(optax.global_norm(jax.tree.leaves(new_state))))


def _train_setup(mesh_sizes: tuple[int, int, int] | None):
    model = build_model(SMALL, seed=0)
    bind = ParamBinder(model)
    optimizer = optax.adamw(1e-3, weight_decay=0.01)
    params = to_flat(model)
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, SMALL.vocab_size)

    def loss_fn(p, toks):
        logprobs = jax.nn.log_softmax(bind(p)(toks).logits[:, :-1], axis=-1)
        return -jnp.take_along_axis(logprobs, toks[:, 1:, None], axis=-1).mean()

    def step(p, opt_state, toks):
        loss, grads = jax.value_and_grad(loss_fn)(p, toks)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    if mesh_sizes is None:
        return jax.jit(step), params, optimizer.init(params), tokens, None
    mesh = make_mesh(*mesh_sizes)
    shapes = expected_shapes(SMALL)
    p_sh = shardings_for(param_specs(shapes, mesh), mesh)
    o_sh = optimizer_state_shardings(jax.eval_shape(optimizer.init, params), p_sh, mesh, shapes)
    out = (p_sh, o_sh, NamedSharding(mesh, P()))
    sharded = (
        shard_tree(params, p_sh),
        shard_tree(optimizer.init(params), o_sh),
        jax.device_put(tokens, batch_sharding(mesh)),
    )
    return jax.jit(step, out_shardings=out), *sharded, out


def check_train_step(_: Path) -> None:
    step, params, opt_state, tokens, _ = _train_setup(None)
    ref = jax.device_get(step(params, opt_state, tokens))
    step, params, opt_state, tokens, out = _train_setup((2, 2, 2))
    assert tokens.sharding.spec == P(("data", "fsdp")) and _shard_shapes(tokens) == {(2, 16)}
    new_params, new_opt, loss = step(params, opt_state, tokens)
    np.testing.assert_allclose(float(loss), float(ref[2]), rtol=1e-5)
    for name, value in new_params.items():
        np.testing.assert_allclose(np.asarray(value), ref[0][name], atol=1e-5, err_msg=name)
        assert value.sharding == out[0][name], name
        assert not np.allclose(np.asarray(value), np.asarray(params[name])), f"{name} did not train"
    assert jax.tree.all(jax.tree.map(lambda a, s: a.sharding == s, new_opt, out[1]))
    assert not new_params["layers.0.mlp.up"].sharding.is_fully_replicated


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def check_cross_mesh_restore(tmp: Path) -> None:
    _, params, opt_state, _, _ = _train_setup((2, 2, 2))
    rng = jax.random.key_data(jax.random.key(7))
    state = {
        "params": params,
        "opt_state": opt_state,
        "step": 5,
        "rng": rng,
        "data_position": 40,
        "history": [{"loss": 2.0}],
    }
    with TrainCheckpointer(tmp / "ckpt", keep=2) as saver:
        saver.save(5, state, {"val_loss": 1.5})
    host = jax.device_get({"params": params, "opt_state": opt_state})
    optimizer = optax.adamw(1e-3, weight_decay=0.01)
    shapes = expected_shapes(SMALL)
    for sizes in ((1, 4, 2), (8, 1, 1)):
        mesh = make_mesh(*sizes)
        p_sh = shardings_for(param_specs(shapes, mesh), mesh)
        o_sh = optimizer_state_shardings(jax.eval_shape(optimizer.init, params), p_sh, mesh, shapes)
        target = {
            "params": _abstract(params, p_sh),
            "opt_state": _abstract(opt_state, o_sh),
            "rng": jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=NamedSharding(mesh, P())),
            "step": 0,
            "data_position": 0,
            "history": [],
        }
        with TrainCheckpointer(tmp / "ckpt", keep=2) as loader:
            restored = loader.restore_latest(target)
            best = loader.restore_best(target)
        assert (restored["step"], restored["data_position"], restored["history"]) == (5, 40, [{"loss": 2.0}])
        assert np.array_equal(np.asarray(restored["rng"]), np.asarray(rng))
        assert restored["rng"].sharding == NamedSharding(mesh, P())
        for key, shard in (("params", p_sh), ("opt_state", o_sh)):
            jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored[key]), host[key])
            jax.tree.map(np.testing.assert_array_equal, jax.device_get(best[key]), host[key])
            assert jax.tree.all(
                jax.tree.map(
                    lambda a, s: a.sharding == s and a.sharding.mesh.shape == s.mesh.shape, restored[key], shard
                )
            )
        if sizes == (1, 4, 2):
            assert _shard_shapes(restored["params"]["layers.0.mlp.up"]) == {(8, 32)}
            assert _shard_shapes(restored["opt_state"][0].mu["embedding"]) == {(64, 8)}
        else:
            assert restored["params"]["embedding"].sharding.is_fully_replicated  # params are not split over data


def _allocated(compiled) -> int:
    """Bytes one device holds for a compiled program: its live arguments and outputs, and its scratch."""
    a = compiled.memory_analysis()
    return a.argument_size_in_bytes + a.output_size_in_bytes - a.alias_size_in_bytes + a.temp_size_in_bytes


# the stages' per-device memory estimates against XLA's compiled memory analysis of what they run, on the tiny
# profile: within this factor (fusion and layout decide the activations XLA keeps; measured 1.2x to 2.4x)
MEMORY_FACTOR = (0.7, 3.0)


def check_memory_estimates(_: Path) -> None:
    from gemstill.distill.optim import make_optimizer
    from gemstill.distill.placement import Placement
    from gemstill.distill.run import Run, Teacher, initial_params
    from gemstill.distill.step import make_train_step
    from gemstill.distill.strategies import TERMS
    from gemstill.model import abstract_model
    from gemstill.pipeline.profile import load_profile
    from gemstill.pipeline.student_stages import student_config, train_baseline_memory
    from gemstill.pipeline.teacher import teacher_config
    from gemstill.pipeline.teacher_stages import teacher_cache_memory
    from gemstill.teacher_cache.compute import teacher_summary

    for sizes, extra in (((8, 1, 1), {}), ((2, 2, 2), {}), ((1, 8, 1), {}), ((2, 4, 1), {"data.seq_len": 512})):
        mesh_keys = {
            f"hardware.mesh.{axis}": size for axis, size in zip(("data", "fsdp", "tensor"), sizes, strict=True)
        }
        profile = load_profile("tiny", {**mesh_keys, **extra})[0]
        teacher = teacher_config(profile)
        student = student_config(profile, teacher)
        run = Run(
            student, to_flat(build_model(student)), (), profile.distill, profile.training, Teacher(teacher, None, None)
        )
        mesh = make_mesh(*sizes)
        place = Placement(mesh, profile.training)
        optimizer = make_optimizer(profile.training.optimizer, profile.training.steps)
        params, param_shardings = place.params(initial_params(run))
        opt_state, state_shardings = place.optimizer_state(optimizer, params, param_shardings)
        scalar = place.replicated()
        step = make_train_step(run, optimizer, (param_shardings, state_shardings, {n: scalar for n in TERMS}, scalar))
        training = profile.training
        shape = (training.grad_accum, training.batch_size // training.grad_accum, profile.data.seq_len)
        batch = {
            name: jax.ShapeDtypeStruct(shape, jnp.float32 if name == "weights" else jnp.int32, sharding=place.batch())
            for name in ("tokens", "positions", "segment_ids", "labels", "weights")
        }
        with jax.set_mesh(mesh):  # as train() compiles it
            compiled = step.lower(params, opt_state, None, batch, jnp.asarray(0)).compile()
        ratio = _allocated(compiled) / train_baseline_memory(profile)["total"]
        assert MEMORY_FACTOR[0] <= ratio <= MEMORY_FACTOR[1], f"training step on mesh {sizes} {extra}: {ratio:.2f}x"

    # the teacher cache: every device runs whole batches of teacher_cache.batch_size sequences
    graphdef, state = nnx.split(abstract_model(teacher))
    rows = jax.ShapeDtypeStruct((profile.teacher_cache.batch_size, profile.data.seq_len), jnp.int32)
    compiled = teacher_summary.lower(
        graphdef, state, rows, rows, rows, jax.ShapeDtypeStruct(rows.shape[:1], jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32), k=profile.teacher_cache.k, temperature=1.0, sampled=False,
    ).compile()  # fmt: skip
    ratio = _allocated(compiled) / teacher_cache_memory(profile)["total"]
    assert MEMORY_FACTOR[0] <= ratio <= MEMORY_FACTOR[1], f"teacher cache: {ratio:.2f}x"


CHECKS = {
    f.__name__: f for f in (check_param_specs, check_train_step, check_cross_mesh_restore, check_memory_estimates)
}


@pytest.fixture(scope="module")
def eight_device_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return run_in_child(__file__, CHECKS, str(tmp_path_factory.mktemp("eight_devices")))


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_on_eight_devices(check: str, eight_device_results: dict[str, str]) -> None:
    assert eight_device_results[check] == "", eight_device_results[check]


# ---------------------------------------------------------------- one-device checks, in process


def test_make_mesh_names_the_device_count_and_the_profile_setting() -> None:
    with pytest.raises(GemstillError, match=r"= 8 devices, but 1 cpu devices exist; set hardware.mesh.*= 1"):
        make_mesh(2, 2, 2)
    with pytest.raises(GemstillError, match="at least 1"):
        make_mesh(0, 1, 1)
    mesh = make_mesh(1, 1, 1)
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.shape == (1, 1, 1)


def test_param_specs_refuses_a_known_name_of_the_wrong_rank() -> None:
    with pytest.raises(GemstillError, match=r"layers\.0\.mlp\.up has shape"):
        param_specs({"layers.0.mlp.up": (4, 4, 4)}, make_mesh(1, 1, 1))


def _state(value: float) -> dict:
    params = {"embedding": jnp.full((4, 3), value), "layers.0.mlp.up": jnp.arange(6.0).reshape(2, 3) * value}
    return {
        "params": params,
        "opt_state": optax.adam(1e-3).init(params),
        "stateless": optax.sgd(1e-3).init(params),  # only empty tuples: must not come back as JSON lists
        "rng": jax.random.key_data(jax.random.key(int(value))),
        "step": int(value),
        "data_position": 10 * int(value),
        "history": [{"step": i, "loss": 1.0 / (i + 1), "note": "x"} for i in range(int(value))],
    }


def test_keeps_the_latest_n_and_the_best_by_validation(tmp_path: Path) -> None:
    val = {1: 3.0, 3: 1.0, 4: float("nan"), 6: 2.0}  # steps 2, 5, 7, 8 have no validation
    with TrainCheckpointer(tmp_path, keep=2) as ckpt:
        assert ckpt.latest_step() is None and ckpt.best_step() is None
        for step in range(1, 9):
            ckpt.save(step, _state(step), {"val_loss": val[step]} if step in val else None)
        assert ckpt.all_steps() == [3, 7, 8]
        assert (ckpt.latest_step(), ckpt.best_step()) == (8, 3)
        assert ckpt.restore_best(_state(0))["step"] == 3
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [3, 7, 8]

    with TrainCheckpointer(tmp_path / "no_best", keep=1, best_metric=None, async_save=False) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _state(step), {"val_loss": 0.1 * step})
        assert ckpt.all_steps() == [2] and ckpt.best_step() is None and ckpt.metrics(2) == {"val_loss": 0.2}
        with pytest.raises(GemstillError, match="no checkpoint with None"):
            ckpt.restore_best(_state(0))


def test_state_round_trips_after_reopening(tmp_path: Path) -> None:
    saved = _state(4)
    with TrainCheckpointer(tmp_path, keep=3) as ckpt:
        ckpt.save(4, saved, {"val_loss": 0.5})
        saved["history"].append({"step": 99})  # after save returns: must not leak into the checkpoint
    with TrainCheckpointer(tmp_path, keep=3) as ckpt:
        assert ckpt.latest_step() == 4 and ckpt.best_step() == 4 and ckpt.metrics(4) == {"val_loss": 0.5}
        restored = ckpt.restore_latest(_state(0))
    expected = _state(4)
    assert restored["history"] == expected["history"] and json.dumps(restored["history"])
    assert (restored["step"], restored["data_position"]) == (4, 40)
    assert isinstance(restored["step"], int)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored["params"]), jax.device_get(expected["params"]))
    jax.tree.map(np.testing.assert_array_equal, restored["opt_state"], expected["opt_state"])
    assert restored["stateless"] == (optax.EmptyState(), optax.EmptyState())
    assert restored["rng"].dtype == jnp.uint32
    assert jnp.array_equal(jax.random.wrap_key_data(restored["rng"]), jax.random.key(4))


def test_refuses_bad_saves_and_mismatched_targets(tmp_path: Path) -> None:
    with TrainCheckpointer(tmp_path, keep=2) as ckpt:
        with pytest.raises(GemstillError, match="holds no checkpoint; start the run from scratch"):
            ckpt.restore_latest(_state(0))
        ckpt.save(2, _state(2))
        with pytest.raises(GemstillError, match="step 2 is not after the latest saved step 2"):
            ckpt.save(2, _state(2))
        with pytest.raises(GemstillError, match="lack 'val_loss'"):
            ckpt.save(3, _state(3), {"train_loss": 1.0})
        with pytest.raises(GemstillError, match="but the target has"):
            ckpt.restore_latest({k: v for k, v in _state(0).items() if k != "rng"})
        wrong = _state(0)
        wrong["params"]["embedding"] = jnp.zeros((5, 3))
        with pytest.raises(GemstillError, match=r"step 2 .* does not restore"):
            ckpt.restore_latest(wrong)
        with pytest.raises(GemstillError, match="keep=0"):
            TrainCheckpointer(tmp_path / "other", keep=0)


@pytest.mark.parametrize("damage", ["truncate_arrays", "truncate_meta", "remove_arrays"])
def test_damaged_checkpoint_is_a_gemstill_error(tmp_path: Path, damage: str) -> None:
    with TrainCheckpointer(tmp_path, keep=2) as ckpt:
        ckpt.save(1, _state(1))
        ckpt.save(2, _state(2))
    step_dir = tmp_path / "2"
    if damage == "remove_arrays":
        shutil.rmtree(step_dir / "arrays")
    else:
        files = [p for p in (step_dir / damage.removeprefix("truncate_")).rglob("*") if p.is_file()]
        for path in files:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with TrainCheckpointer(tmp_path, keep=2) as ckpt:
        with pytest.raises(GemstillError, match=r"step 2 .*delete that step's directory"):
            ckpt.restore_latest(_state(0))
        assert ckpt.restore(1, _state(0))["step"] == 1  # the earlier checkpoint is untouched


def test_an_unfinished_save_is_ignored(tmp_path: Path) -> None:
    """A process killed mid-save leaves only Orbax's temporary directory: the previous step stays the latest."""
    with TrainCheckpointer(tmp_path, keep=2) as ckpt:
        ckpt.save(1, _state(1))
    shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp-1234")
    with TrainCheckpointer(tmp_path, keep=2) as ckpt:
        assert ckpt.latest_step() == 1 and ckpt.restore_latest(_state(0))["step"] == 1


if __name__ == "__main__":  # the child process of eight_device_results
    report(CHECKS, Path(sys.argv[1]))
