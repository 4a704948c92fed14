"""Model tools: `info` (config, counts, memory), `score` (log-probabilities), `generate` and `export`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gemstill.cli.options import DtypeOpt, JsonOpt, ModelOpt, ParamDtypeOpt, err
from gemstill.errors import GemstillError


def _read_text(text: str | None, text_file: Path | None, what: str) -> str:
    if (text is None) == (text_file is None):
        raise GemstillError(f"give exactly one of --{what} or --{what}-file")
    if text_file is None:
        return text or ""
    try:
        return text_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GemstillError(f"--{what}-file {text_file}: file not found; check the path") from None
    except UnicodeDecodeError:
        raise GemstillError(f"--{what}-file {text_file}: not UTF-8 text; convert it to UTF-8") from None


QuantizeOpt = Annotated[
    str | None,
    typer.Option(help="quantize on load and keep packed: int8, q8_0 or q4_0 (a q8_0/q4_0 GGUF stays packed anyway)"),
]


def _load(spec: str, param_dtype: str, dtype: str, quantize: str | None = None):
    """The model with a GGUF's Q8_0/Q4_0 weights kept packed in memory (dequantized layer by layer when run)."""
    from gemstill.loading import load_model

    with err.status(f"loading {spec}"):
        return load_model(spec, param_dtype=param_dtype, dtype=dtype, packed=True, quantize=quantize)


def score(
    model: ModelOpt,
    text: Annotated[str | None, typer.Option(help="text to score")] = None,
    text_file: Annotated[Path | None, typer.Option(help="file whose text to score")] = None,
    as_json: JsonOpt = False,
    dtype: DtypeOpt = "float32",
    param_dtype: ParamDtypeOpt = "float32",
    quantize: QuantizeOpt = None,
) -> None:
    """Per-token log-probabilities and perplexity of a text (BOS is prepended)."""
    from gemstill.scoring import Scorer, perplexity

    content = _read_text(text, text_file, "text")
    loaded = _load(model, param_dtype, dtype, quantize)
    tokenizer = loaded.require_tokenizer()
    ids = tokenizer.encode(content)
    logprobs = Scorer(loaded.model).logprobs([ids])[0]
    ppl = perplexity(logprobs)
    if as_json:
        result = {
            "model": model,
            "token_ids": ids,
            "tokens": [tokenizer.id_to_piece(i) for i in ids],
            "logprobs": [float(x) for x in logprobs],
            "num_scored": len(logprobs),
            "nll": float(-logprobs.mean()),
            "perplexity": ppl,
        }
        print(json.dumps(result, ensure_ascii=False))
        return
    table = Table("pos", "token", "id", "log p")
    for pos, (token_id, lp) in enumerate(zip(ids[1:], logprobs, strict=True), start=1):
        table.add_row(str(pos), repr(tokenizer.id_to_piece(token_id)), str(token_id), f"{lp:.4f}")
    Console().print(table)
    print(f"tokens scored: {len(logprobs)}  mean NLL: {-logprobs.mean():.4f}  perplexity: {ppl:.3f}")


def generate(
    model: ModelOpt,
    prompt: Annotated[str | None, typer.Option(help="prompt text")] = None,
    prompt_file: Annotated[Path | None, typer.Option(help="file holding the prompt")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate at most")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy")] = 0.0,
    top_k: Annotated[int | None, typer.Option(help="sample among the k likeliest tokens")] = None,
    top_p: Annotated[float | None, typer.Option(help="nucleus sampling mass")] = None,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    chat: Annotated[bool, typer.Option("--chat", help="wrap the prompt in Gemma's chat template")] = False,
    as_json: JsonOpt = False,
    dtype: DtypeOpt = "float32",
    param_dtype: ParamDtypeOpt = "float32",
    quantize: QuantizeOpt = None,
) -> None:
    """Continue a prompt (streamed to the terminal); stops at <eos> or <end_of_turn>."""
    from gemstill.sampler import Sampler, SamplingParams

    content = _read_text(prompt, prompt_file, "prompt")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    loaded = _load(model, param_dtype, dtype, quantize)
    tokenizer = loaded.require_tokenizer()
    ids = tokenizer.encode_chat([{"role": "user", "content": content}]) if chat else tokenizer.encode(content)
    generated: list[int] = []
    shown = ""

    def stream(step_tokens) -> None:
        nonlocal shown
        if step_tokens[0] < 0:
            return
        generated.append(int(step_tokens[0]))
        text_now = tokenizer.decode(generated)
        if not text_now.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text_now[len(shown) :])
            sys.stdout.flush()
            shown = text_now

    new_ids = Sampler(loaded.model).generate(
        [ids], params, stop_ids=tokenizer.stop_ids, on_step=None if as_json else stream
    )[0]
    if as_json:
        result = {
            "model": model,
            "prompt_token_ids": ids,
            "token_ids": new_ids,
            "text": tokenizer.decode(new_ids),
            "stopped": bool(new_ids) and new_ids[-1] in tokenizer.stop_ids,
        }
        print(json.dumps(result, ensure_ascii=False))
    else:
        sys.stdout.write("\n")


def info(
    model: ModelOpt,
    context: Annotated[int, typer.Option(help="context length for the KV-cache figure", min=1)] = 8192,
    as_json: JsonOpt = False,
    dtype: DtypeOpt = "float32",
    param_dtype: ParamDtypeOpt = "float32",
) -> None:
    """Config, parameter counts and memory estimate. Takes a spec or a variant name (e.g. gemma3-27b)."""
    from gemstill.memory import human
    from gemstill.model_info import model_info

    described = model_info(model, context, dtype, param_dtype)
    if as_json:
        print(json.dumps(described))
        return
    table = Table("field", "value", title=f"{model}")
    for key, value in described["config"].items():
        table.add_row(key, str(value))
    for key, value in described["params"].items():
        table.add_row(f"params.{key}", f"{value:,}")
    for key, value in described["memory"].items():
        table.add_row(key, human(value))
    Console().print(table)


def export(
    model: ModelOpt,
    format_: Annotated[str, typer.Option("--format", help="hf, gguf or orbax")],
    out: Annotated[Path, typer.Option(help="the export directory to create")],
    quant: Annotated[
        str | None, typer.Option(help="hf: f32|f16|bf16; gguf: f32|f16|bf16|q8_0|q4_0; orbax: f32|bf16")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
    keep_embedding: Annotated[
        bool, typer.Option(help="gguf q8_0/q4_0: keep the tied embedding / LM head in f32")
    ] = False,
) -> None:
    """Export a model: a Hugging Face directory, a llama.cpp GGUF (in OUT/model.gguf) or a native checkpoint.

    The export is written beside OUT and renamed into place, with a model card (README.md); nothing is left
    behind on failure.
    """
    from gemstill.export import ModelCard, check_out, check_request, export_model
    from gemstill.loading import load_checkpoint
    from gemstill.params import count_params

    chosen = check_request(format_, quant)  # refuse a bad request before loading anything
    check_out(out, overwrite)
    with err.status(f"loading {model}"):
        config, flat, tokenizer = load_checkpoint(model)
    card = ModelCard(
        title=f"{model} exported by gemstill",
        facts=(
            ("source", model),
            ("architecture", f"Gemma 3, {config.num_layers} layers, width {config.embed_dim}"),
            ("parameters", f"{count_params(config)['total']:,}"),
        ),
    )
    with err.status(f"writing {out}"):
        export_model(config, flat, tokenizer, format_, out, chosen, card, overwrite, not keep_embedding)
    print(out)
