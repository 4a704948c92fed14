"""Width pruning by measurement (gemstill.distill.width): FFN unit and query-head importance and the narrower
student it builds.

- The importance E|a_i| * ||down_i|| equals the one computed from transformers' own FFN activations (a forward
  hook on each layer's down_proj input) on the same random weights: rtol 1e-4.
- A student keeping every block and each block's chosen units computes exactly what the teacher computes with the
  other units' down rows zeroed (float32, atol 1e-5): the pruning removes those units and nothing else.
- Head importance E||v_n W_o[n]|| equals the one computed from transformers' own attention values (a forward hook
  on each layer's o_proj input, times its o_proj columns): rtol 1e-4. A student keeping the chosen heads computes
  exactly what the teacher computes with the other heads' o_proj rows zeroed (atol 1e-5), and every key/value
  group keeps as many heads as the others.
- Channel importance (mean |output| of every input norm and of the final norm) equals the one read from
  transformers' own norm outputs: rtol 1e-4. A teacher whose residual stream is zero in some channels, pruned
  to the others, gives exactly its logits (atol 1e-4: only RMSNorm's epsilon sees the width), which checks the
  embedding-scale and norm compensation.
- Keeping every unit copies the teacher exactly; bad unit lists and unsupported narrowings are one-line errors.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY
from transformers import AutoModelForCausalLM

from gemstill.checkpoints.hf import save_hf
from gemstill.distill.layer_map import LayerMap
from gemstill.distill.student_init import init_student_from_teacher
from gemstill.distill.width import (
    channel_importance,
    ffn_importance,
    head_importance,
    kept_heads,
    kept_units,
    with_ffn_units,
    with_kept_channels,
    with_kept_heads,
)
from gemstill.errors import GemstillError
from gemstill.model import build_model
from gemstill.params import check_flat, from_flat, to_flat

SEQ = 21  # longer than TINY's window of 8: local and global layers differ


def _random_teacher(seed: int) -> dict[str, np.ndarray]:
    """TINY with random values everywhere (norms too: zeros at init would hide a mapping bug)."""
    rng = np.random.default_rng(seed)
    flat = to_flat(build_model(TINY))
    return {
        n: rng.normal(0, 0.3 if n.endswith(".scale") else 0.15, np.shape(v)).astype(np.float32) for n, v in flat.items()
    }


def _batch(rows: int = 2) -> dict[str, np.ndarray]:
    """Two packed rows: row 0 one document, row 1 a document of 13 tokens then 8 of padding."""
    tokens = np.random.default_rng(1).integers(0, TINY.vocab_size, size=(rows, SEQ)).astype(np.int32)
    segments = np.ones((rows, SEQ), np.int32)
    segments[1, 13:] = 0
    positions = np.tile(np.arange(SEQ, dtype=np.int32), (rows, 1))
    return {"tokens": tokens, "positions": positions, "segment_ids": segments}


def _reference(tmp_path, flat: dict[str, np.ndarray]):
    """transformers' Gemma 3 on the same weights (saved as an HF directory), float32, eager attention."""
    save_hf(tmp_path / "hf", TINY, flat)
    return AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _each_row(reference, batch: dict[str, np.ndarray]):
    """Run `reference` on each row of `batch` alone, unpadded (the padding of row 1 never enters transformers),
    yielding after each row so its forward hooks' captures can be read."""
    real = batch["segment_ids"] > 0
    with torch.no_grad():
        for row in range(len(real)):
            reference(torch.tensor(batch["tokens"][row : row + 1, : int(real[row].sum())], dtype=torch.long))
            yield row


def test_ffn_importance_matches_transformers_activations(tmp_path):
    flat = _random_teacher(seed=3)
    reference = _reference(tmp_path, flat)
    captured: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(reference.model.layers):
        layer.mlp.down_proj.register_forward_hook(lambda _m, args, _out, i=index: captured.__setitem__(i, args[0]))
    batch = _batch()
    rows = [{i: a[0].abs() for i, a in captured.items()} for _ in _each_row(reference, batch)]
    expected = np.stack(
        [
            (torch.cat([r[i] for r in rows]).mean(0) * layer.mlp.down_proj.weight.norm(dim=0)).detach().numpy()
            for i, layer in enumerate(reference.model.layers)
        ]
    )
    importance = ffn_importance(from_flat(TINY, flat), [batch])
    assert importance.shape == (TINY.num_layers, TINY.hidden_dim)
    np.testing.assert_allclose(importance, expected, rtol=1e-4, atol=1e-7)
    # batching does not change it: token-weighted means
    halves = [{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}]
    np.testing.assert_allclose(ffn_importance(from_flat(TINY, flat), halves), importance, rtol=1e-5)


def test_width_pruned_student_is_the_teacher_without_the_dropped_units():
    flat = _random_teacher(seed=5)
    teacher = from_flat(TINY, flat)
    importance = ffn_importance(teacher, [_batch()])
    width = 24  # of 128
    pairs = [(i, i) for i in range(TINY.num_layers)]
    every = LayerMap(strategy="uniform", pairs=pairs, student_layers=TINY.num_layers, teacher_layers=TINY.num_layers)
    layer_map = with_ffn_units(every, importance, width)
    student_config = TINY.replace(hidden_dim=width)
    init = init_student_from_teacher(
        student_config, TINY, flat, pairs, seed=0, projection="importance", ffn_units=layer_map.ffn_units
    )
    check_flat(student_config, init.params, "student")
    # the units kept are the most important ones of each block
    for t, units in layer_map.ffn_units.items():
        assert len(units) == width and units == sorted(units)
        assert importance[t][units].min() >= np.delete(importance[t], units).max()
    masked = dict(flat)
    for t, units in layer_map.ffn_units.items():
        dropped = np.ones(TINY.hidden_dim, bool)
        dropped[units] = False
        down = np.array(flat[f"layers.{t}.mlp.down"])
        down[dropped] = 0.0
        masked[f"layers.{t}.mlp.down"] = down
    tokens = jnp.asarray(_batch()["tokens"])
    ours = np.asarray(from_flat(student_config, init.params)(tokens).logits)
    np.testing.assert_allclose(ours, np.asarray(from_flat(TINY, masked)(tokens).logits), atol=1e-5)
    assert np.abs(ours - np.asarray(teacher(tokens).logits)).max() > 1e-2  # the pruning does change the model
    # keeping every unit copies the teacher exactly
    full = with_ffn_units(every, importance, TINY.hidden_dim)
    same = init_student_from_teacher(TINY, TINY, flat, pairs, seed=0, projection="importance", ffn_units=full.ffn_units)
    np.testing.assert_array_equal(
        np.asarray(from_flat(TINY, same.params)(tokens).logits), np.asarray(teacher(tokens).logits)
    )
    # the units survive the layer map's JSON
    assert LayerMap.from_json(layer_map.to_json()).ffn_units == layer_map.ffn_units


def test_kept_units_take_the_largest_and_break_ties_low():
    assert kept_units(np.array([0.1, 3.0, 0.5, 3.0, 2.0]), 3) == [1, 3, 4]
    assert kept_units(np.array([1.0, 1.0, 1.0]), 2) == [0, 1]
    with pytest.raises(GemstillError, match="cannot keep 4 of 3 FFN units"):
        kept_units(np.ones(3), 4)


@pytest.mark.parametrize(
    ("changes", "units", "message"),
    [
        ({"hidden_dim": 24}, None, r"no FFN units chosen for teacher block\(s\) \[0, 1\]; re-run the layer_map stage"),
        ({"hidden_dim": 24}, {0: list(range(23)), 1: list(range(24))}, "teacher block 0 keeps 23 FFN units, need 24"),
        ({"hidden_dim": 24}, {0: [0] * 24, 1: list(range(24))}, "need 24 distinct ones below 128"),
        (
            {"hidden_dim": 24, "head_dim": 8},
            None,
            r"query heads and embedding channels only, .* head_dim 8 < 16; keep those",
        ),
    ],
)
def test_bad_ffn_units_are_refused(changes, units, message):
    flat = _random_teacher(seed=0)
    with pytest.raises(GemstillError, match=message):
        init_student_from_teacher(
            TINY.replace(num_layers=2, **changes), TINY, flat, [(0, 0), (1, 1)], 0, "importance", units
        )
    with pytest.raises(GemstillError, match=r"FFN units were chosen but student\.projection is not importance"):
        init_student_from_teacher(
            TINY.replace(num_layers=2, hidden_dim=24), TINY, flat, [(0, 0)], 0, "truncate", {0: list(range(24))}
        )


def test_init_nll_scores_each_distinct_student_once(tmp_path, monkeypatch):
    """Maps that copy the same blocks and units are one student: scored once, the score given to each name; the
    scores are those of the students built directly, every FFN pruned by the map's units."""
    from gemstill.data.format import write_split
    from gemstill.distill import init_nll as module
    from gemstill.distill.evaluate import Candidate, evaluate_models

    batch = _batch(rows=3)
    loss_mask = (batch["segment_ids"] > 0).astype(np.int8)
    write_split(tmp_path, "validation", batch["tokens"], batch["positions"], batch["segment_ids"], loss_mask)
    flat = _random_teacher(seed=6)
    importance = ffn_importance(from_flat(TINY, flat), [batch])
    student = TINY.replace(num_layers=2, hidden_dim=32)

    def layer_map(pairs):
        plain = LayerMap(strategy="explicit", pairs=pairs, student_layers=2, teacher_layers=TINY.num_layers)
        return with_ffn_units(plain, importance, 32)

    maps = {
        "uniform": layer_map([(0, 2), (1, 6)]),
        "angular": layer_map([(0, 2), (1, 6)]),
        "last": layer_map([(0, 5), (1, 6)]),
    }
    scored = []
    real = module.evaluate_models
    monkeypatch.setattr(
        module, "evaluate_models", lambda t, s, *a, **k: scored.append([c.name for c in s]) or real(t, s, *a, **k)
    )
    nll = module.init_nll(student, TINY, flat, maps, tmp_path, 3, 0, "importance", progress=lambda _: None)
    assert scored == [["uniform", "last"]] and nll["angular"] == nll["uniform"] != nll["last"]
    for name in ("uniform", "last"):
        pairs = maps[name].pairs
        init = init_student_from_teacher(student, TINY, flat, pairs, 0, "importance", maps[name].ffn_units)
        rows = evaluate_models(
            Candidate("teacher", TINY, flat), [Candidate(name, student, init.params)], tmp_path, progress=lambda _: None
        )
        assert nll[name] == pytest.approx(rows[1]["val_nll"], rel=1e-6) and nll["teacher"] == pytest.approx(
            rows[0]["val_nll"], rel=1e-6
        )


def test_head_importance_matches_transformers_attention_values(tmp_path):
    flat = _random_teacher(seed=7)
    reference = _reference(tmp_path, flat)
    captured: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(reference.model.layers):
        layer.self_attn.o_proj.register_forward_hook(lambda _m, args, _out, i=index: captured.__setitem__(i, args[0]))
    batch = _batch()
    heads, head_dim = TINY.num_heads, TINY.head_dim
    per_layer: dict[int, list[torch.Tensor]] = {i: [] for i in range(TINY.num_layers)}
    for _ in _each_row(reference, batch):
        for i, layer in enumerate(reference.model.layers):
            values = captured[i][0].reshape(-1, heads, head_dim)  # [T, heads, head_dim]
            columns = layer.self_attn.o_proj.weight.reshape(TINY.embed_dim, heads, head_dim)
            per_layer[i].append(torch.einsum("tnh,dnh->tnd", values, columns).norm(dim=-1))
    expected = np.stack([torch.cat(per_layer[i]).mean(0).numpy() for i in range(TINY.num_layers)])
    importance = head_importance(from_flat(TINY, flat), [batch])
    assert importance.shape == (TINY.num_layers, TINY.num_heads)
    np.testing.assert_allclose(importance, expected, rtol=1e-4, atol=1e-7)


def test_head_pruned_student_is_the_teacher_without_the_dropped_heads():
    flat = _random_teacher(seed=9)
    teacher = from_flat(TINY, flat)
    importance = head_importance(teacher, [_batch()])
    pairs = [(i, i) for i in range(TINY.num_layers)]
    every = LayerMap(strategy="uniform", pairs=pairs, student_layers=TINY.num_layers, teacher_layers=TINY.num_layers)
    layer_map = with_kept_heads(every, importance, 2, TINY.num_kv_heads)  # 2 of 4 heads, one per kv group
    student_config = TINY.replace(num_heads=2, hidden_dim=24)
    units = with_ffn_units(every, ffn_importance(teacher, [_batch()]), 24).ffn_units  # both prunings at once
    init = init_student_from_teacher(
        student_config, TINY, flat, pairs, 0, "importance", ffn_units=units, heads=layer_map.heads
    )
    check_flat(student_config, init.params, "student")
    masked = dict(flat)
    for t, kept in layer_map.heads.items():
        assert [h // 2 for h in kept] == [0, 1]  # one head from each key/value group
        o_proj = np.array(flat[f"layers.{t}.attn.o_proj"])
        o_proj[[h for h in range(TINY.num_heads) if h not in kept]] = 0.0
        masked[f"layers.{t}.attn.o_proj"] = o_proj
        down = np.array(flat[f"layers.{t}.mlp.down"])
        down[[u for u in range(TINY.hidden_dim) if u not in units[t]]] = 0.0
        masked[f"layers.{t}.mlp.down"] = down
    tokens = jnp.asarray(_batch()["tokens"])
    ours = np.asarray(from_flat(student_config, init.params)(tokens).logits)
    np.testing.assert_allclose(ours, np.asarray(from_flat(TINY, masked)(tokens).logits), atol=1e-5)
    assert np.abs(ours - np.asarray(teacher(tokens).logits)).max() > 1e-2
    assert LayerMap.from_json(layer_map.to_json()).heads == layer_map.heads


def test_kept_heads_keep_each_group_whole_and_refuse_bad_counts():
    # heads 0 and 1 share kv head 0, heads 2 and 3 kv head 1: the two best (0, 1) are in one group
    assert kept_heads(np.array([5.0, 4.0, 1.0, 2.0]), 2, 2) == [0, 3]
    assert kept_heads(np.array([5.0, 4.0, 1.0, 2.0]), 2, 1) == [0, 1]
    with pytest.raises(GemstillError, match="multiple of 2"):
        kept_heads(np.ones(4), 3, 2)
    flat = _random_teacher(seed=1)
    pairs = [(i, i) for i in range(TINY.num_layers)]
    bad = {t: [0, 1] for t in range(TINY.num_layers)}  # both from kv group 0
    with pytest.raises(GemstillError, match="not as many from each of its 2 key/value groups"):
        init_student_from_teacher(TINY.replace(num_heads=2), TINY, flat, pairs, 0, "importance", heads=bad)
    with pytest.raises(GemstillError, match="no query heads chosen"):
        init_student_from_teacher(TINY.replace(num_heads=2), TINY, flat, pairs, 0, "importance")


def test_channel_importance_matches_transformers_norm_outputs(tmp_path):
    flat = _random_teacher(seed=11)
    reference = _reference(tmp_path, flat)
    norms = [reference.model.norm]
    for layer in reference.model.layers:
        norms += [layer.input_layernorm, layer.pre_feedforward_layernorm]
    captured: dict[int, torch.Tensor] = {}
    for index, norm in enumerate(norms):
        norm.register_forward_hook(lambda _m, _args, out, i=index: captured.__setitem__(i, out[0].abs()))
    batch = _batch()
    rows = [sum(captured[i] for i in range(len(norms))) / len(norms) for _ in _each_row(reference, batch)]
    expected = torch.cat(rows).mean(0).numpy()
    importance = channel_importance(from_flat(TINY, flat), [batch])
    assert importance.shape == (TINY.embed_dim,)
    np.testing.assert_allclose(importance, expected, rtol=1e-4, atol=1e-7)


def test_dropping_dead_embedding_channels_keeps_the_teachers_logits():
    flat = _random_teacher(seed=13)
    dead = np.random.default_rng(0).choice(TINY.embed_dim, 16, replace=False)
    flat["embedding"][:, dead] = 0.0  # nothing writes these channels: the residual stream is zero there
    for layer in range(TINY.num_layers):
        flat[f"layers.{layer}.attn.o_proj"][..., dead] = 0.0
        flat[f"layers.{layer}.mlp.down"][:, dead] = 0.0
    teacher = from_flat(TINY, flat)
    importance = channel_importance(teacher, [_batch()])
    width = TINY.embed_dim - len(dead)
    pairs = [(i, i) for i in range(TINY.num_layers)]
    every = LayerMap(strategy="uniform", pairs=pairs, student_layers=TINY.num_layers, teacher_layers=TINY.num_layers)
    layer_map = with_kept_channels(every, importance, width)
    assert set(layer_map.channels) == set(range(TINY.embed_dim)) - set(dead.tolist())  # the dead ones score 0
    student_config = TINY.replace(embed_dim=width)
    init = init_student_from_teacher(student_config, TINY, flat, pairs, 0, "importance", channels=layer_map.channels)
    check_flat(student_config, init.params, "student")
    tokens = jnp.asarray(_batch()["tokens"])
    ours = np.asarray(from_flat(student_config, init.params)(tokens).logits)
    np.testing.assert_allclose(ours, np.asarray(teacher(tokens).logits), atol=1e-4)
    # live channels dropped: the model changes, and the compensation is what kept it equal above
    fewer = init_student_from_teacher(
        TINY.replace(embed_dim=width - 8), TINY, flat, pairs, 0, "importance", channels=layer_map.channels[8:]
    )
    changed = np.asarray(from_flat(TINY.replace(embed_dim=width - 8), fewer.params)(tokens).logits)
    assert np.abs(changed - np.asarray(teacher(tokens).logits)).max() > 1e-2
    assert LayerMap.from_json(layer_map.to_json()).channels == layer_map.channels
    with pytest.raises(GemstillError, match="need 48 distinct ones below 64"):
        init_student_from_teacher(student_config, TINY, flat, pairs, 0, "importance", channels=[0] * width)
    with pytest.raises(GemstillError, match="no embedding channels chosen"):
        init_student_from_teacher(student_config, TINY, flat, pairs, 0, "importance")
