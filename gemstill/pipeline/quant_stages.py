"""The deployment stages: quantize (post-training, round to nearest), qat (quantization-aware distillation) and
export (thin glue over gemstill.quant, gemstill.distill.train and gemstill.export).

Each quantized variant is stored as its deployment format: a GGUF (`<format>/model.gguf`, the very tensors an
export writes, without the tokenizer metadata, whose 262k strings gguf-py takes 8 s to parse) for q8_0 and q4_0,
a native checkpoint of the on-grid weights (`<format>/quantized`) for int8. The evaluate stage scores exactly
those files, so its rows predict what llama.cpp computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gemstill.config import Gemma3Config
from gemstill.errors import GemstillError
from gemstill.pipeline.context import StageContext
from gemstill.pipeline.profile import Profile

GGUF_FILE = "model.gguf"
NATIVE_DIR = "quantized"


def variant_spec(directory: Path, fmt: str) -> str:
    """The model spec of a stored quantized variant."""
    from gemstill.quant.codec import GGUF_FORMATS

    return f"gguf:{directory / GGUF_FILE}" if fmt in GGUF_FORMATS else f"orbax:{directory / NATIVE_DIR}"


def save_variant(directory: Path, config: Gemma3Config, flat: dict[str, Any], fmt: str, tokenizer, embedding: bool):
    """Store a quantized variant of float params (quantized here, round to nearest) in its deployment format
    (the tokenizer goes into the int8 checkpoint only; exports add it to GGUFs)."""
    from gemstill.checkpoints.gguf_file import save_gguf
    from gemstill.checkpoints.native import save_native
    from gemstill.quant.codec import GGUF_FORMATS
    from gemstill.quant.weights import quantized_params

    directory.mkdir(parents=True, exist_ok=True)
    if fmt in GGUF_FORMATS:
        return save_gguf(
            directory / GGUF_FILE,
            config,
            flat,
            quant=fmt,
            quantize_embedding=embedding,
        )
    return save_native(
        directory / NATIVE_DIR, config, quantized_params(config, flat, fmt, embedding), tokenizer.model_proto
    )


def _student(ctx: StageContext) -> tuple[Gemma3Config, dict[str, Any]]:
    from gemstill.checkpoints.native import load_native

    model_dir = ctx.input("train_student") / "model"
    if not (model_dir / "config.json").is_file():
        raise GemstillError(f"stage {ctx.stage}: no trained student in {model_dir}; run the train_student stage first")
    return load_native(model_dir)


def _tokenizer(ctx: StageContext):
    from gemstill.tokenizer import Tokenizer

    return Tokenizer.from_file(ctx.input("prepare_data") / "tokenizer.model")


def _validate_formats(profile: Profile, formats: list[str]) -> None:
    """Refuse, when the plan is made, a student whose weights do not split into the formats' 32-value blocks."""
    from gemstill.pipeline.student_stages import student_config
    from gemstill.pipeline.teacher import teacher_config
    from gemstill.quant.weights import check_params

    student = student_config(profile, teacher_config(profile))
    for fmt in formats:
        check_params(student, fmt, profile.quantize.embedding)


def validate_ptq(profile: Profile) -> None:
    _validate_formats(profile, profile.quantize.formats)


def validate_qat(profile: Profile) -> None:
    _validate_formats(profile, profile.qat.formats)


def quantize_stage(ctx: StageContext) -> dict[str, Any]:
    """Post-training quantization of the trained student into every format of `quantize.formats`."""
    from gemstill.params import count_params

    settings = ctx.profile.quantize
    config, params = _student(ctx)
    tokenizer = _tokenizer(ctx)
    metrics: dict[str, Any] = {}
    for fmt in settings.formats:
        path = save_variant(ctx.workdir / fmt, config, params, fmt, tokenizer, settings.embedding)
        size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
        metrics[f"{fmt}_bytes_per_parameter"] = size / count_params(config)["total"]
        ctx.log(f"quantize: {fmt} round to nearest, {size / 2**20:.1f} MiB")
    return metrics


def qat_run(profile: Profile, config: Gemma3Config, params: dict[str, Any], cache_dir: Path, fmt: str | None):
    """The training Run of QAT in `fmt`: train_student's objective without intermediate terms (QAT adds none),
    the qat section's steps and learning rate; fmt None is the same run without the quantizer (a control)."""
    from gemstill.distill.config import AttentionLossConfig, HiddenLossConfig
    from gemstill.distill.run import FakeQuant, Run, Teacher
    from gemstill.pipeline.teacher import teacher_config

    objective = profile.distill.model_copy(
        update={"hidden": HiddenLossConfig(), "attention": AttentionLossConfig(), "online_teacher": False}
    )
    return Run(
        student=config,
        init_params=params,
        pairs=(),
        objective=objective,
        training=profile.qat.training_config(profile.training),
        teacher=Teacher(
            config=teacher_config(profile),
            params=None,
            cache_dir=cache_dir,
            cache_temperature=profile.teacher_cache.temperature,
        ),
        title=f"qat-{fmt}" if fmt else "fp32-continued",
        learning_rate_key="qat.learning_rate",
        fake_quant=FakeQuant(fmt, profile.quantize.embedding) if fmt else None,
    )


def qat_stage(ctx: StageContext) -> dict[str, Any]:
    """Continue the trained student through the fake quantizer of each `qat.formats`, on the distillation loss
    from the teacher cache, with train_student's loop (resume, NaN stop, checkpoints, progress); then store the
    weights on the format's grid, which is exactly what the export writes."""
    from gemstill.checkpoints.native import load_native
    from gemstill.distill.train import train
    from gemstill.pipeline.mesh import profile_mesh

    profile = ctx.profile
    config, params = _student(ctx)
    tokenizer = _tokenizer(ctx)
    metrics: dict[str, Any] = {}
    for fmt in profile.qat.formats:
        out = ctx.workdir / fmt
        run = qat_run(profile, config, params, ctx.input("teacher_cache"), fmt)
        result = train(
            run,
            ctx.training_data(),
            out,
            tokenizer.model_proto,
            log=ctx.log,
            mesh=profile_mesh(profile),
            persist=ctx.persist,
            report_progress=ctx.progress,
        )
        _, master = load_native(out / "model")
        save_variant(out, config, master, fmt, tokenizer, profile.quantize.embedding)
        metrics.update({f"{fmt}_{k}": v for k, v in result.items() if k in ("validation_loss", "final_train_loss")})
    return metrics


def variant_candidates(ctx: StageContext) -> list[tuple[str, str, str]]:
    """(row name, format, model spec) of every quantized variant among the stage's inputs: PTQ first, then QAT."""
    rows = []
    for task, suffix, formats in (
        ("quantize", "ptq", ctx.profile.quantize.formats),
        ("qat", "qat", ctx.profile.qat.formats),
    ):
        if task in ctx.inputs:
            rows += [(f"student-{fmt}-{suffix}", fmt, variant_spec(ctx.input(task) / fmt, fmt)) for fmt in formats]
    return rows


def _settings(ctx: StageContext, task: str) -> dict[str, Any]:
    """The settings an upstream stage's key hashed, from its committed manifest (empty if it is not an input)."""
    import json

    if task not in ctx.inputs:
        return {}
    return json.loads((ctx.inputs[task] / "manifest.json").read_text()).get("settings", {})


def export_stage(ctx: StageContext) -> dict[str, Any]:
    """Write every export the profile lists, each with its model card; a quantized GGUF comes from the QAT
    student of its format when the qat stage trained one (source: auto)."""
    import json

    from gemstill.export import GEMMA_TERMS, SCRATCH_TERMS, ModelCard, export_model
    from gemstill.loading import load_checkpoint
    from gemstill.quant.codec import GGUF_FORMATS

    profile = ctx.profile
    if not profile.export:
        raise GemstillError("stage export: the profile's export section is empty; list targets, e.g. [{format: hf}]")
    config, student = _student(ctx)
    tokenizer = _tokenizer(ctx)
    rows: list[dict[str, Any]] = []
    if "evaluate" in ctx.inputs:
        rows = json.loads((ctx.input("evaluate") / "report.json").read_text())["rows"]
    teacher = profile.teacher
    teacher_label = teacher.model or "trained from scratch by gemstill ({} layers, width {})".format(
        teacher.scratch.architecture.get("num_layers"), teacher.scratch.architecture.get("embed_dim")
    )
    trained = _settings(ctx, "train_student")  # what the student was trained with, as its stage recorded it
    data = _settings(ctx, "prepare_data").get("data") or {}
    distill, training = trained.get("distill") or {}, trained.get("training") or {}
    facts = [
        ("profile", profile.name),
        ("teacher", teacher_label),
        ("student", f"Gemma 3 architecture, {config.num_layers} layers, width {config.embed_dim}"),
        ("data", f"{data.get('source')}, sequences of {data.get('seq_len')} tokens"),
        (
            "distillation",
            f"{distill.get('divergence')}, alpha {distill.get('alpha')}, {training.get('steps')} steps",
        ),
        *[(f"stage key: {name}", key) for name, key in sorted(ctx.input_keys.items())],
    ]
    metrics: dict[str, Any] = {}
    for target in profile.export:
        from_qat = target.quant in profile.qat.formats and "qat" in ctx.inputs and target.source != "student"
        if target.source == "qat" and not from_qat:
            raise GemstillError(
                f"export {target.name}: source qat, but no qat stage trained {target.quant}; add it to qat.formats"
            )
        flat = student
        rounded = ", round to nearest" if target.quant in GGUF_FORMATS else ""
        how = f"{target.quant} from the fp32 student{rounded}"
        if from_qat:
            _, flat, _ = load_checkpoint(variant_spec(ctx.input("qat") / target.quant, target.quant))
            steps = (_settings(ctx, "qat").get("qat") or {}).get("steps") or training.get("steps")
            how = f"{target.quant} from quantization-aware training ({steps} steps): lossless"
        coverage = "linear layers and the tied embedding" if profile.quantize.embedding else "linear layers"
        card = ModelCard(
            title=f"{profile.name} student",
            facts=(*facts, ("quantization", f"{how}; quantized: {coverage}")),
            rows=tuple(rows),
            license=SCRATCH_TERMS if teacher.scratch is not None else GEMMA_TERMS,
        )
        path = export_model(
            config,
            flat,
            tokenizer,
            target.format,
            ctx.workdir / target.name,
            target.quant,
            card,
            overwrite=True,
            quantize_embedding=profile.quantize.embedding,
        )
        metrics[f"{target.name}_bytes"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        ctx.log(f"export: {target.name} ({how}) -> {path}")
    return metrics
