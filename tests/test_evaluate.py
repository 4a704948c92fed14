"""The evaluation numbers (held-out NLL, perplexity, exact KL to the teacher) against a float64 numpy reference
computed from the models' full logits: relative tolerance 1e-5 (float32 logits; the KL is taken from the model's
logsumexp and its dot with the teacher's probabilities, not from a log-softmax of each model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from gemstill.data.format import write_split
from gemstill.distill import evaluate
from gemstill.distill.evaluate import Candidate, evaluate_models
from gemstill.model import build_model
from gemstill.params import from_flat, to_flat


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_nll_and_kl_equal_a_float64_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "EVAL_CHUNK", 16)  # several tiles per batch, the last one partial
    rng = np.random.default_rng(0)
    rows, length = 5, 24
    tokens = rng.integers(0, TINY.vocab_size, (rows, length)).astype(np.int32)
    segments = np.ones((rows, length), np.int32)
    segments[1, 15:] = 0  # padding
    positions = np.tile(np.arange(length, dtype=np.int32), (rows, 1))
    loss_mask = (rng.random((rows, length)) < 0.7).astype(np.int8) * (segments > 0)
    write_split(tmp_path, "validation", tokens, positions, segments, loss_mask)
    teacher_config = TINY
    student_config = TINY.replace(num_layers=2)
    teacher = {k: np.asarray(v) for k, v in to_flat(build_model(teacher_config, seed=1)).items()}
    student = {k: np.asarray(v) * 1.3 for k, v in to_flat(build_model(student_config, seed=2)).items()}
    rows_out = evaluate_models(
        Candidate("teacher", teacher_config, teacher),
        [Candidate("student", student_config, student)],
        tmp_path,
        batch_size=2,
        progress=lambda _: None,
    )

    def logprobs(config, flat):
        model = from_flat(config, flat)
        out = model(tokens, positions, mask=segments > 0, segment_ids=segments)
        return _log_softmax(np.asarray(out.logits, np.float64))

    weights = np.pad(loss_mask[:, 1:] > 0, ((0, 0), (0, 1)))
    labels = np.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    log_t, log_s = logprobs(teacher_config, teacher), logprobs(student_config, student)
    picked = np.take_along_axis(log_s, labels[..., None], axis=-1)[..., 0]
    nll = -(picked * weights).sum() / weights.sum()
    kl = ((np.exp(log_t) * (log_t - log_s)).sum(-1) * weights).sum() / weights.sum()
    teacher_nll = -(np.take_along_axis(log_t, labels[..., None], axis=-1)[..., 0] * weights).sum() / weights.sum()
    by_name = {row["model"]: row for row in rows_out}
    assert by_name["student"]["tokens"] == by_name["teacher"]["tokens"] == int(weights.sum())
    assert by_name["student"]["val_nll"] == pytest.approx(nll, rel=1e-5)
    assert by_name["student"]["kl_to_teacher"] == pytest.approx(kl, rel=1e-5)
    assert by_name["teacher"]["val_nll"] == pytest.approx(teacher_nll, rel=1e-5)
    assert by_name["teacher"]["kl_to_teacher"] == 0.0
    assert by_name["student"]["val_ppl"] == pytest.approx(np.exp(nll), rel=1e-5)


def test_qat_recovery_says_what_happened_instead_of_a_share_over_one():
    """QAT's share of PTQ's loss won back: a percentage up to 100; beyond it (QAT's extra training beat the fp32
    student itself) the note says so with both values, and with no PTQ loss, that there was none."""
    from gemstill.pipeline.evaluate_stage import qat_recovery

    rows = [
        {"model": "student", "val_nll": 3.0, "kl_to_teacher": 0.2},
        {"model": "student-q4_0-ptq", "val_nll": 3.5, "kl_to_teacher": 0.4},
        {"model": "student-q4_0-qat", "val_nll": 2.9, "kl_to_teacher": 0.3},
        {"model": "student-q8_0-ptq", "val_nll": 2.99, "kl_to_teacher": 0.2},
        {"model": "student-q8_0-qat", "val_nll": 2.98, "kl_to_teacher": 0.2},
    ]
    q4, q8 = qat_recovery(rows)
    assert q4 == (
        "q4_0: PTQ costs +0.5000 NLL and +0.2000 KL against the fp32 student; QAT wins back all of the NLL loss and "
        "more: 2.9000 against the fp32 student's 3.0000 and wins back 50% of the KL loss."
    )
    assert "%" not in q4.split(" and wins back")[0]
    assert q8.endswith("QAT has no NLL loss to win back and has no KL loss to win back.")
    assert rows[2]["qat_recovery_nll"] == pytest.approx(1.2) and rows[2]["qat_recovery_kl"] == pytest.approx(0.5)


def test_report_images_embed_for_views_that_cannot_reach_the_store(tmp_path):
    import base64

    from gemstill.plots import embed_images

    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 8
    (tmp_path / "evaluation.png").write_bytes(png)
    markdown = "# r\n\n![evaluation](evaluation.png)\n\n![gone](missing.png)\n"
    embedded = embed_images(markdown, tmp_path)
    assert f"![evaluation](data:image/png;base64,{base64.b64encode(png).decode()})" in embedded
    assert "![gone](missing.png)" in embedded  # nothing to embed: left as written
    assert embed_images(f"![a]({tmp_path / 'evaluation.png'})", Path("/elsewhere")).startswith("![a](data:image/png")
