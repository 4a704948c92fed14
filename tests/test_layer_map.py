"""Layer maps (uniform, last, explicit, adaptive CKA) and student initialization from the teacher's layers."""

from __future__ import annotations

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from gemstill.config import Gemma3Config
from gemstill.distill.angular import angular_distances, kept_blocks, least_changing_run
from gemstill.distill.cka import cka_matrix, linear_cka, teacher_cka
from gemstill.distill.layer_map import (
    LayerMap,
    LayerMapConfig,
    choose_layers,
    make_layer_map,
    validate_mapping,
)
from gemstill.distill.student_init import init_student_from_teacher, with_teacher_types
from gemstill.errors import GemstillError
from gemstill.model import build_model
from gemstill.params import LAYER_PARAMS, check_flat, from_flat, to_flat

TEACHER = Gemma3Config(
    num_layers=6,
    embed_dim=32,
    hidden_dim=64,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    sliding_window=4,
    vocab_size=128,
    max_context=64,
)  # layer 5 is global, layers 0-4 slide


def hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA the textbook way: HSIC of the Gram matrices with the centering matrix H."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, m = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h))

    return hsic(k, m) / np.sqrt(hsic(k, k) * hsic(m, m))


def test_linear_cka_matches_hsic_and_its_invariances() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12)) + 3.0  # an offset: centering must remove it
    y = x @ rng.normal(size=(12, 7)) + 0.5 * rng.normal(size=(40, 7))
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(hsic_cka(x, y), abs=1e-6)
    assert 0.0 < linear_cka(x, y) < 0.99
    assert linear_cka(x @ q, y) == pytest.approx(hsic_cka(x, y), abs=1e-6)  # orthogonal transform
    assert linear_cka(3.7 * x, y) == pytest.approx(hsic_cka(x, y), abs=1e-6)  # isotropic scaling
    noise = rng.normal(size=(40, 12))
    assert linear_cka(x, noise) == pytest.approx(hsic_cka(x, noise), abs=1e-6)


@pytest.mark.parametrize("tokens", [10, 60])  # fewer tokens than dims: Gram path; more: cross-product path
def test_cka_matrix_symmetric_unit_diagonal_and_pairwise(tokens: int) -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(tokens, 24))
    features = [base, base @ rng.normal(size=(24, 16)), rng.normal(size=(tokens, 20)), np.tanh(base) + 0.1]
    sim = cka_matrix(features)
    assert sim.shape == (4, 4)
    np.testing.assert_allclose(sim, sim.T)
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-10)
    for i in range(4):
        for j in range(4):
            assert sim[i, j] == pytest.approx(hsic_cka(features[i], features[j]), abs=1e-6)


def test_choose_layers_covers_blocks_and_keeps_last() -> None:
    rng = np.random.default_rng(2)
    blocks = [range(0, 4), range(4, 6), range(6, 11)]
    sim = np.full((11, 11), 0.1)
    for block in blocks:
        sim[np.ix_(block, block)] = 0.85
    sim += 0.02 * rng.random((11, 11))
    sim = (sim + sim.T) / 2
    np.fill_diagonal(sim, 1.0)
    chosen = choose_layers(sim, 3)
    assert chosen[-1] == 10 and chosen == sorted(chosen)
    assert [sum(c in block for c in chosen) for block in blocks] == [1, 1, 1]
    assert choose_layers(np.ones((5, 5)), 2) == [3, 4]  # all ties: the later layers
    assert choose_layers(sim, 11) == list(range(11))
    with pytest.raises(GemstillError, match="count=12"):
        choose_layers(sim, 12)


@pytest.mark.parametrize(
    ("config", "student", "teacher", "pairs"),
    [
        ({}, 3, 6, [(0, 1), (1, 3), (2, 5)]),
        ({}, 4, 6, [(0, 1), (1, 2), (2, 4), (3, 5)]),  # 1.5, 3, 4.5, 6: halves round up
        ({}, 5, 5, [(i, i) for i in range(5)]),
        ({"num_pairs": 2}, 6, 12, [(2, 5), (5, 11)]),
        ({"num_pairs": 1}, 4, 26, [(3, 25)]),
        ({"strategy": "last"}, 2, 6, [(0, 4), (1, 5)]),
        ({"strategy": "last", "num_pairs": 1}, 3, 5, [(2, 4)]),
        ({"strategy": "explicit", "pairs": [(1, 5), (0, 2)]}, 2, 6, [(0, 2), (1, 5)]),
        ({"strategy": "explicit", "pairs": [(0, 3), (2, 3)]}, 3, 4, [(0, 3), (2, 3)]),
    ],
)
def test_fixed_mappings(config: dict, student: int, teacher: int, pairs: list[tuple[int, int]]) -> None:
    result = make_layer_map(LayerMapConfig(**config), student, teacher)
    assert result.pairs == pairs
    assert result.similarity is None
    assert (result.student_layers, result.teacher_layers) == (student, teacher)


@pytest.mark.parametrize(
    ("config", "student", "teacher", "message"),
    [
        ({"strategy": "explicit"}, 2, 6, "strategy 'explicit' needs pairs"),
        ({"pairs": [(0, 1)]}, 2, 6, "pairs are only read by strategy 'explicit'"),
        ({"num_pairs": 0}, 2, 6, "num_pairs=0 must be between 1 and the student's 2 layers"),
        ({"num_pairs": 3}, 2, 6, "num_pairs=3 must be between 1"),
        ({}, 8, 6, "8 pairs but the teacher has only 6 layers"),
        ({"strategy": "last"}, 7, 6, "needs a student no deeper than the teacher"),
        ({"strategy": "explicit", "pairs": [(0, 1), (1, 2), (2, 3)]}, 2, 6, "3 pairs but the student has only 2"),
        ({"strategy": "explicit", "pairs": [(0, 1), (1, 2), (2, 3)]}, 4, 2, "teacher has only 2 layers"),
        ({"strategy": "explicit", "pairs": [(2, 1)]}, 2, 6, "student layer 2, outside 0..1"),
        ({"strategy": "explicit", "pairs": [(0, 6)]}, 2, 6, "teacher layer 6, outside 0..5"),
        ({"strategy": "explicit", "pairs": [(-1, 0)]}, 2, 6, "student layer -1"),
        ({"strategy": "explicit", "pairs": [(1, 1), (1, 2)]}, 2, 6, "student layer 1 appears in more than one pair"),
        ({"strategy": "explicit", "pairs": [(0, 4), (1, 2)]}, 2, 6, "go backwards in teacher depth"),
        ({"strategy": "explicit", "pairs": [(0, 1)], "num_pairs": 2}, 2, 6, "but 1 explicit pairs"),
        ({"strategy": "adaptive", "sample_sequences": 0}, 2, 6, "sample_sequences >= 1"),
        ({}, 0, 6, "need at least one layer"),
    ],
)
def test_validation_errors(config: dict, student: int, teacher: int, message: str) -> None:
    with pytest.raises(GemstillError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_mapping(LayerMapConfig(**config), student, teacher)


def test_adaptive_needs_model_and_sample() -> None:
    with pytest.raises(GemstillError, match="needs the teacher model and a data sample"):
        make_layer_map(LayerMapConfig(strategy="adaptive"), 2, 6)


def test_saved_json_is_rechecked(tmp_path) -> None:
    saved = make_layer_map(LayerMapConfig(strategy="last"), 2, 6)
    written = saved.save(tmp_path)
    assert [p.name for p in written] == ["layer_map.json", "layer_map.png"]
    assert LayerMap.from_json((tmp_path / "layer_map.json").read_text()) == saved
    bad = saved.model_copy(update={"pairs": [(0, 5), (1, 4)]}).to_json()
    with pytest.raises(GemstillError, match="backwards in teacher depth"):
        LayerMap.from_json(bad)
    truncated = (tmp_path / "layer_map.json").read_text()[:20]
    with pytest.raises(GemstillError, match=r"^run/layer_map.json: damaged layer map \(the file: Invalid JSON"):
        LayerMap.from_json(truncated, source="run/layer_map.json")
    with pytest.raises(GemstillError, match=r"damaged layer map \(strategy: Field required\); re-run the layer_map"):
        LayerMap.from_json("{}")


@pytest.fixture(scope="module")
def teacher():
    return build_model(TEACHER, seed=0)


@pytest.fixture(scope="module")
def sample() -> dict[str, np.ndarray]:
    """4 packed rows of 12 tokens: two documents in row 0, padding (segment 0) at the end of rows 1 and 3."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, TEACHER.vocab_size, size=(4, 12)).astype(np.int32)
    segment_ids = np.ones((4, 12), np.int32)
    segment_ids[0, 7:] = 2
    segment_ids[1, 9:] = 0
    segment_ids[3, 5:] = 0
    positions = np.tile(np.arange(12, dtype=np.int32), (4, 1))
    positions[0, 7:] -= 7
    return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids}


def _real_hidden_states(teacher, sample) -> list[np.ndarray]:
    """The teacher's hidden states (embedding, then each block) on the sample's real tokens, in one plain call."""
    out = teacher(
        jnp.asarray(sample["tokens"]),
        jnp.asarray(sample["positions"]),
        mask=jnp.asarray(sample["segment_ids"] > 0),
        segment_ids=jnp.asarray(sample["segment_ids"]),
        return_logits=False,
        return_hidden=True,
    )
    real = sample["segment_ids"] > 0
    return [np.asarray(h)[real] for h in out.hidden_states]


def test_teacher_cka_on_real_tokens(teacher, sample) -> None:
    sim = teacher_cka(teacher, [sample], max_tokens=1000)
    expected = cka_matrix(_real_hidden_states(teacher, sample)[1:])
    assert sim.shape == (TEACHER.num_layers, TEACHER.num_layers)
    np.testing.assert_allclose(sim, expected, atol=1e-5)
    # with a token cap, the subset depends on the data only, not on the batching
    halves = [{k: v[:2] for k, v in sample.items()}, {k: v[2:] for k, v in sample.items()}]
    np.testing.assert_allclose(
        teacher_cka(teacher, halves, max_tokens=20), teacher_cka(teacher, [sample], max_tokens=20), atol=1e-5
    )


def test_adaptive_layer_map(teacher, sample, tmp_path) -> None:
    config = LayerMapConfig(strategy="adaptive", num_pairs=2, sample_sequences=4)
    result = make_layer_map(config, 3, TEACHER.num_layers, teacher_model=teacher, sample=sample)
    students = [s for s, _ in result.pairs]
    teachers = [t for _, t in result.pairs]
    assert students == [1, 2] and teachers[-1] == 5 and teachers == sorted(set(teachers))
    sim = np.asarray(result.similarity)
    assert sim.shape == (6, 6)
    assert teachers == choose_layers(sim, 2)
    assert LayerMap.from_json(result.to_json()) == result
    result.save(tmp_path)
    assert LayerMap.from_json((tmp_path / "layer_map.json").read_text()) == result
    image = matplotlib.image.imread(tmp_path / "layer_map.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200 and image.shape[2] in (3, 4)


def test_student_copies_mapped_teacher_layers() -> None:
    teacher_flat = to_flat(build_model(TEACHER, seed=0))
    student = TEACHER.replace(num_layers=3)
    init = init_student_from_teacher(student, TEACHER, teacher_flat, [(0, 2), (2, 5)], seed=7)
    check_flat(student, init.params, "student")
    np.testing.assert_array_equal(init.params["embedding"], teacher_flat["embedding"])
    np.testing.assert_array_equal(init.params["final_norm.scale"], teacher_flat["final_norm.scale"])
    for s, t in [(0, 2), (2, 5)]:
        for name in LAYER_PARAMS:
            np.testing.assert_array_equal(init.params[f"layers.{s}.{name}"], teacher_flat[f"layers.{t}.{name}"])
    random_student = to_flat(build_model(student, seed=7))
    np.testing.assert_array_equal(init.params["layers.1.attn.q_proj"], random_student["layers.1.attn.q_proj"])
    assert not np.array_equal(init.params["layers.1.attn.q_proj"], teacher_flat["layers.1.attn.q_proj"])
    # student layer 2 slides (pattern 6) while teacher layer 5 is global
    assert init.notes == ["student layer 2 is sliding-window (4) but copies teacher layer 5, which is global"]


def test_student_blocks_keep_the_types_of_the_teacher_blocks_they_copy() -> None:
    """student.layer_types: teacher: block 2 copies the global teacher block 5 and becomes global (full attention,
    the global RoPE base); the uncopied block 1 keeps its pattern's type; no block then attends differently."""
    teacher_flat = to_flat(build_model(TEACHER, seed=0))
    student = with_teacher_types(TEACHER.replace(num_layers=3), TEACHER, [(0, 2), (2, 5)])
    assert student.types == ("sliding_attention", "sliding_attention", "full_attention")
    assert student.layer_windows == (4, 4, None)
    init = init_student_from_teacher(student, TEACHER, teacher_flat, [(0, 2), (2, 5)], seed=7)
    assert init.notes == []
    # every block kept: the types are the teacher's own pattern, stored as the pattern (None)
    assert with_teacher_types(TEACHER, TEACHER, [(i, i) for i in range(6)]) == TEACHER


def test_student_copying_every_layer_reproduces_teacher_logits() -> None:
    teacher = build_model(TEACHER, seed=0)
    pairs = [(i, i) for i in range(TEACHER.num_layers)]
    init = init_student_from_teacher(TEACHER, TEACHER, to_flat(teacher), pairs, seed=11)
    assert init.notes == []
    student = from_flat(TEACHER, init.params)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, TEACHER.vocab_size, size=(2, 10)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(student(tokens).logits), np.asarray(teacher(tokens).logits))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"embed_dim": 16}, r"narrower than the teacher's \(embed_dim 16 < 32\); set student.init: random or"),
        ({"num_heads": 2, "num_kv_heads": 1}, r"num_heads 2 < 4, num_kv_heads 1 < 2\); set student.init: random"),
        ({"hidden_dim": 128}, r"wider than the teacher's \(hidden_dim 128 > 64\)"),
        ({"vocab_size": 256}, "vocab_size 256 differs from the teacher's 128"),
    ],
)
def test_student_width_mismatch_rejected(changes: dict, message: str) -> None:
    teacher_flat = to_flat(build_model(TEACHER, seed=0))
    with pytest.raises(GemstillError, match=message):
        init_student_from_teacher(TEACHER.replace(num_layers=2, **changes), TEACHER, teacher_flat, [(0, 0)], seed=0)


def test_truncate_projection_copies_leading_slices() -> None:
    teacher_flat = to_flat(build_model(TEACHER, seed=0))
    student = TEACHER.replace(num_layers=2, embed_dim=16, hidden_dim=24, num_heads=2, num_kv_heads=1, head_dim=4)
    init = init_student_from_teacher(student, TEACHER, teacher_flat, [(0, 1), (1, 4)], seed=0, projection="truncate")
    check_flat(student, init.params, "student")
    np.testing.assert_array_equal(init.params["embedding"], np.asarray(teacher_flat["embedding"])[:, :16])
    q = np.asarray(teacher_flat["layers.4.attn.q_proj"])[:16, :2, :4]
    np.testing.assert_array_equal(init.params["layers.1.attn.q_proj"], q)
    np.testing.assert_array_equal(
        init.params["layers.0.mlp.down"], np.asarray(teacher_flat["layers.1.mlp.down"])[:24, :16]
    )
    k = np.asarray(teacher_flat["layers.4.attn.k_proj"])[:16, :1, :4]
    np.testing.assert_array_equal(init.params["layers.1.attn.k_proj"], k)
    np.testing.assert_array_equal(
        init.params["layers.1.attn.q_norm.scale"], teacher_flat["layers.4.attn.q_norm.scale"][:4]
    )


def _kahan_angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle between rows of a and b by Kahan's formula 2 atan2(|u - v|, |u + v|) on unit vectors: another
    route than arccos of the cosine."""
    u = a / np.linalg.norm(a, axis=-1, keepdims=True)
    v = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return 2 * np.arctan2(np.linalg.norm(u - v, axis=-1), np.linalg.norm(u + v, axis=-1))


def test_angular_distances_and_the_run_they_drop() -> None:
    rng = np.random.default_rng(0)
    states = [rng.normal(size=(50, 16)) for _ in range(5)]
    distances = angular_distances(states)
    for i in range(5):
        for j in range(5):
            expected = 0.0 if i == j else float(np.mean(_kahan_angle(states[i], states[j])) / np.pi)
            assert abs(distances[i, j] - expected) < 1e-9
    # hidden states 1 -> 3 barely move (blocks 1 and 2 do little): a 2-block run drops them
    hand = np.full((6, 6), 0.5)
    np.fill_diagonal(hand, 0.0)
    hand[1, 3] = hand[3, 1] = 0.1
    assert least_changing_run(hand, 2) == 1
    assert kept_blocks(hand, 3) == [0, 3, 4]
    assert kept_blocks(hand, 5) == [0, 1, 2, 3, 4]  # nothing to drop


def test_angular_layer_map_keeps_all_but_the_least_changing_run(teacher, sample, tmp_path) -> None:
    """Student of 4 from the 6-block teacher: the distances come from the teacher's own hidden states on the
    real tokens (checked with Kahan's angle), the 2-block run whose ends are closest is dropped."""
    result = make_layer_map(LayerMapConfig(strategy="angular"), 4, 6, teacher_model=teacher, sample=sample)
    states = [h.astype(np.float64) for h in _real_hidden_states(teacher, sample)]
    runs = [float(np.mean(_kahan_angle(states[first], states[first + 2]))) for first in range(5)]
    start = int(np.argmin(runs))
    assert result.pairs == [(s, t) for s, t in enumerate(b for b in range(6) if b not in (start, start + 1))]
    np.testing.assert_allclose(np.asarray(result.angular_distance)[start, start + 2], runs[start] / np.pi, atol=1e-5)
    assert LayerMap.from_json(result.to_json()) == result
    result.save(tmp_path)
    assert matplotlib.image.imread(tmp_path / "layer_map.png").shape[0] > 200
    every = make_layer_map(LayerMapConfig(strategy="angular"), 6, 6, teacher_model=teacher, sample=sample)
    assert every.pairs == [(i, i) for i in range(6)]
    with pytest.raises(GemstillError, match="strategy 'angular' needs a student no deeper than the teacher"):
        make_layer_map(LayerMapConfig(strategy="angular"), 7, 6, teacher_model=teacher, sample=sample)


def test_candidates_of_a_student_as_deep_as_its_teacher_are_the_identity_map(teacher, sample) -> None:
    """With every block kept, each strategy pairs block s with teacher block s: candidate_maps takes that
    without running the teacher, and it is what each strategy computes."""
    from gemstill.distill.init_nll import CANDIDATES, candidate_maps

    settings = LayerMapConfig(strategy="uniform", sample_sequences=4)
    chosen = make_layer_map(settings, 6, 6)
    maps = candidate_maps(settings, 6, teacher, sample, chosen)
    assert list(maps) == list(CANDIDATES)
    for strategy in CANDIDATES:
        computed = make_layer_map(settings.model_copy(update={"strategy": strategy}), 6, 6, teacher, sample)
        assert maps[strategy].pairs == computed.pairs == [(i, i) for i in range(6)], strategy
