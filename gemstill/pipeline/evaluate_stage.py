"""The evaluate stage: held-out NLL, perplexity and exact KL to the teacher for the teacher, the students and every
quantized variant among the stage's inputs (scored from their stored deployment files), with the report, its
plots and the notes that compare them (thin glue over gemstill.distill.evaluate)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemstill import distributed
from gemstill.errors import GemstillError
from gemstill.pipeline.context import StageContext
from gemstill.pipeline.profile import EvaluateConfig
from gemstill.pipeline.teacher import load_teacher

if TYPE_CHECKING:
    from gemstill.distill.claims import Claim
    from gemstill.distill.evaluate import Candidate


def evaluate_stage(ctx: StageContext) -> dict[str, Any]:
    from gemstill.checkpoints.native import load_native
    from gemstill.distill.claims import report_claims
    from gemstill.distill.evaluate import (
        Candidate,
        read_history,
        report_markdown,
        save_evaluation_plot,
        save_training_curves,
        score_documents,
    )
    from gemstill.fsutil import atomic_write_bytes
    from gemstill.params import to_flat

    settings = ctx.profile.evaluate
    teacher = load_teacher(ctx)
    candidates, histories = [], {}
    for task, name in (("train_student", "student"), ("train_baseline", "baseline")):
        if task in ctx.inputs:
            config, params = load_native(ctx.input(task) / "model")
            candidates.append(Candidate(name, config, params))
            histories[name] = read_history(ctx.input(task))
    if not candidates:
        raise GemstillError(f"stage {ctx.stage} needs a train_student or train_baseline stage in its needs")
    from gemstill.loading import load_checkpoint
    from gemstill.pipeline.quant_stages import variant_candidates
    from gemstill.quant.weights import deployed_bytes

    for name, fmt, spec in variant_candidates(ctx):  # dequantized once: the float32 weights llama.cpp computes with
        config, params, _ = load_checkpoint(spec)
        stored = deployed_bytes(config, fmt, ctx.profile.quantize.embedding)
        candidates.append(Candidate(name, config, params, stored))
    teacher_candidate = Candidate("teacher", teacher.config, to_flat(teacher.model))
    scores = score_documents(
        teacher_candidate,
        candidates,
        ctx.input("prepare_data"),
        split=settings.split,
        batch_size=settings.batch_size,
        max_sequences=settings.max_sequences,
        progress=ctx.log,
    )
    rows = scores.rows()
    by_name = {row["model"]: row for row in rows}
    notes = [
        f"Split: {settings.split}, {rows[0]['tokens']} target tokens in {rows[0]['documents']} documents. KL is exact "
        "(full vocabulary). Intervals: 95%, percentile bootstrap over documents (both sides of a claim on the same "
        "resampled documents)."
    ]
    notes += versus_baseline(by_name, "val_nll", "kl_to_teacher", "")
    claims = report_claims(scores)
    if settings.out_of_domain is not None:
        unquantized = [c for c in candidates if c.name in ("student", "baseline")]
        ood_notes, ood_claims = _score_out_of_domain(ctx, settings, teacher_candidate, unquantized, by_name)
        notes += ood_notes
        claims += ood_claims
    notes += qat_recovery(rows)
    notes += [claim.sentence for claim in claims]
    started = ctx.input("train_student") / "init_nll.json" if "train_student" in ctx.inputs else None
    init = json.loads(started.read_text()) if started is not None and started.is_file() else None
    if init is not None:
        notes.append(
            f"At init the student scored {init['init_nll']:.4f} nats (the teacher {init['teacher_init_nll']:.4f}) on "
            "the layer_map stage's validation sample."
        )
    out: Path = ctx.workdir
    report = {"rows": rows, "claims": [claim.to_json() for claim in claims]}
    report |= {"student_init": init} if init is not None else {}
    if distributed.is_leader():  # every process of a multi-process run holds the same rows; one writes them
        atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode())
        save_evaluation_plot(out / "evaluation.png", rows)
        save_training_curves(out / "training_curves.png", histories)
        markdown = report_markdown("gemstill evaluation report", rows, notes)
        atomic_write_bytes(out / "report.md", markdown.encode())
    for note in notes:
        ctx.log(f"evaluate: {note}")
    keys = ("val_nll", "kl_to_teacher", "ood_nll", "ood_kl_to_teacher")
    metrics = {f"{row['model']}_{key}": row[key] for row in rows for key in keys if key in row}
    return metrics | ({"student_init_nll": init["init_nll"]} if init is not None else {})


def versus_baseline(by_name: dict[str, dict[str, Any]], nll: str, kl: str, where: str) -> list[str]:
    """The note saying whether the distilled student beats the cross-entropy baseline in both NLL and KL."""
    if "student" not in by_name or "baseline" not in by_name:
        return []
    s, b = by_name["student"], by_name["baseline"]
    verdict = "beats" if s[nll] < b[nll] and s[kl] < b[kl] else "does not beat"
    return [
        f"The distilled student {verdict} the cross-entropy baseline{where}: NLL {s[nll]:.4f} vs {b[nll]:.4f}, "
        f"KL {s[kl]:.4f} vs {b[kl]:.4f}."
    ]


def _score_out_of_domain(
    ctx: StageContext,
    settings: EvaluateConfig,
    teacher: Candidate,
    candidates: list[Candidate],
    by_name: dict[str, dict[str, Any]],
) -> tuple[list[str], list[Claim]]:
    """Score the teacher and `candidates` on evaluate.out_of_domain, prepared with the data's tokenizer; the
    results go on their rows as ood_nll / ood_kl_to_teacher; (notes, claims with their intervals)."""
    from gemstill.data.prepare import prepare_scoring_corpus
    from gemstill.distill.claims import report_claims
    from gemstill.distill.evaluate import score_documents
    from gemstill.tokenizer import Tokenizer

    corpus = settings.out_of_domain
    out = ctx.workdir / "out_of_domain"
    if not distributed.is_leader():  # the same corpus, prepared beside process 0's, not over it
        out = Path(tempfile.mkdtemp(prefix=f"out_of_domain.process-{distributed.process_index()}."))
    tokenizer = Tokenizer.from_file(ctx.input("prepare_data") / "tokenizer.model")
    stats = prepare_scoring_corpus(corpus, tokenizer, out)
    ctx.log(f"evaluate: out-of-domain corpus ({corpus.source}): {stats}")
    scores = score_documents(
        teacher,
        candidates,
        out,
        batch_size=settings.batch_size,
        max_sequences=settings.max_sequences,
        progress=ctx.log,
    )
    rows = scores.rows()
    for row in rows:
        by_name[row["model"]].update(ood_nll=row["val_nll"], ood_kl_to_teacher=row["kl_to_teacher"])
    where = f" out of domain ({corpus.source}, {rows[0]['tokens']} target tokens it never trained on)"
    notes = versus_baseline(by_name, "ood_nll", "ood_kl_to_teacher", where)
    return notes, report_claims(scores, " out of domain")


def _recovered(share: float | None, qat: float, student: float, what: str) -> str:
    """What QAT did to one metric's PTQ loss, in words: a share of it won back, all of it and more (its extra
    training beat the fp32 student itself), or nothing to win back."""
    if share is None:
        return f"has no {what} loss to win back"
    if share > 1:
        return f"wins back all of the {what} loss and more: {qat:.4f} against the fp32 student's {student:.4f}"
    return f"wins back {share:.0%} of the {what} loss"


def qat_recovery(rows: list[dict[str, Any]]) -> list[str]:
    """Per format with PTQ and QAT rows: the share of PTQ's loss against the fp32 student that QAT wins back,
    in NLL and in KL, stored on the QAT row (qat_recovery_nll, qat_recovery_kl) and said in a note."""
    by_name = {row["model"]: row for row in rows}
    notes = []
    student = by_name.get("student")
    for name, row in by_name.items():
        ptq = by_name.get(name.removesuffix("-qat") + "-ptq")
        if student is None or not name.endswith("-qat") or ptq is None:
            continue
        for metric, key in (("val_nll", "qat_recovery_nll"), ("kl_to_teacher", "qat_recovery_kl")):
            lost = ptq[metric] - student[metric]
            row[key] = (ptq[metric] - row[metric]) / lost if lost > 0 else None
        fmt = name.removeprefix("student-").removesuffix("-qat")
        notes.append(
            f"{fmt}: PTQ costs {ptq['val_nll'] - student['val_nll']:+.4f} NLL and "
            f"{ptq['kl_to_teacher'] - student['kl_to_teacher']:+.4f} KL against the fp32 student; QAT "
            + " and ".join(
                _recovered(row[key], row[metric], student[metric], what)
                for metric, key, what in (
                    ("val_nll", "qat_recovery_nll", "NLL"),
                    ("kl_to_teacher", "qat_recovery_kl", "KL"),
                )
            )
            + "."
        )
    return notes
