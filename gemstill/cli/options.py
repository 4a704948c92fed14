"""What the command groups share: the option types, `--set KEY=VALUE` parsing and the stderr console."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from gemstill.errors import GemstillError

err = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="gguf:PATH, hf:DIR, orbax:DIR or gemma3-270m")]
DtypeOpt = Annotated[str, typer.Option(help="compute dtype: float32 or bfloat16")]
ParamDtypeOpt = Annotated[str, typer.Option(help="parameter dtype: float32 or bfloat16")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object instead of a table")]

PipelineOpt = Annotated[str | None, typer.Option(help="pipeline YAML (default: the profile's)")]
StoreOpt = Annotated[str | None, typer.Option(help="artifact store root: a directory or fsspec URL")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a profile value: KEY=VALUE")]


def overrides(pairs: list[str] | None) -> dict[str, str]:
    """`--set` pairs as {dotted key: value}."""
    parsed = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise GemstillError(f"--set {pair!r}: expected KEY=VALUE with a dotted key, e.g. teacher_cache.k=32")
        parsed[key] = value
    return parsed
