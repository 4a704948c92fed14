"""Gemma 3 text-decoder configuration: the five published sizes by name, and any custom student size."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from gemstill.errors import GemstillError

VOCAB_SIZE = 262_144
LAYER_TYPES = ("sliding_attention", "full_attention")  # Hugging Face's names: local (windowed) and global
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """Every number that shapes a Gemma 3 text decoder; defaults are those shared by all published sizes."""

    num_layers: int
    embed_dim: int
    hidden_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int
    vocab_size: int = VOCAB_SIZE
    query_pre_attn_scalar: float | None = None  # None: head_dim (stored as a float after init)
    local_rope_base: float = 10_000.0
    global_rope_base: float = 1_000_000.0
    global_rope_scale: float = 1.0  # linear RoPE scaling factor of the global layers
    sliding_window_pattern: int = 6  # layer i is global iff (i + 1) % pattern == 0, unless layer_types is set
    layer_types: tuple[str, ...] | None = None  # per layer, one of LAYER_TYPES; None: follow the pattern
    rms_norm_eps: float = 1e-6
    max_context: int = 32_768
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of activations

    def __post_init__(self) -> None:
        scalar = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
        object.__setattr__(self, "query_pre_attn_scalar", float(scalar))  # one canonical form for equality
        for name in ("num_layers", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise GemstillError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise GemstillError(
                f"model config: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}); pick kv heads that divide the query heads"
            )
        if self.sliding_window <= 0:
            raise GemstillError(f"model config: sliding_window must be positive, got {self.sliding_window}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise GemstillError(f"model config: {name}={getattr(self, name)!r} is not one of {sorted(_DTYPES)}")
        if self.layer_types is not None:
            self._canonical_layer_types(tuple(self.layer_types))

    def _canonical_layer_types(self, types: tuple[str, ...]) -> None:
        """Validate the per-layer list; one with a period is stored as that period (one canonical form, for
        equality and for llama.cpp, which reads a period only)."""
        if len(types) != self.num_layers:
            raise GemstillError(
                f"model config: layer_types has {len(types)} entries but num_layers is {self.num_layers}; give one "
                "per layer (or none, to follow sliding_window_pattern)"
            )
        unknown = sorted(set(types) - set(LAYER_TYPES))
        if unknown:
            raise GemstillError(f"model config: layer_types {unknown} are not among {list(LAYER_TYPES)}")
        for period in [self.sliding_window_pattern, *range(1, self.num_layers + 2)]:
            if types == tuple(LAYER_TYPES[(i + 1) % period == 0] for i in range(self.num_layers)):
                object.__setattr__(self, "sliding_window_pattern", period)
                object.__setattr__(self, "layer_types", None)
                return
        object.__setattr__(self, "layer_types", types)

    @property
    def query_scale(self) -> float:
        """Multiplier applied to queries: 1/sqrt(head_dim), or 1/sqrt(D/heads) for the 27B."""
        return self.query_pre_attn_scalar**-0.5

    @property
    def jnp_param_dtype(self) -> Any:
        return _DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.embed_dim)

    def is_global(self, layer: int) -> bool:
        if self.layer_types is not None:
            return self.layer_types[layer] == "full_attention"
        return (layer + 1) % self.sliding_window_pattern == 0

    @property
    def types(self) -> tuple[str, ...]:
        """Every layer's type by Hugging Face's names, set explicitly or by the pattern."""
        return tuple(LAYER_TYPES[self.is_global(i)] for i in range(self.num_layers))

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per-layer attention window: None for global (full causal) layers."""
        return tuple(None if self.is_global(i) else self.sliding_window for i in range(self.num_layers))

    def replace(self, **changes: Any) -> Gemma3Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Gemma3Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise GemstillError(f"model config: unknown keys {unknown}; valid keys are {sorted(known)}")
        return cls(**values)


def _published(layers: int, dim: int, ffn: int, heads: int, kv: int, head_dim: int, window: int, **kw: Any):
    return Gemma3Config(
        num_layers=layers,
        embed_dim=dim,
        hidden_dim=ffn,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        sliding_window=window,
        **kw,
    )


_LONG = {"global_rope_scale": 8.0, "max_context": 131_072}
VARIANTS: dict[str, Gemma3Config] = {
    "gemma3-270m": _published(18, 640, 2048, 4, 1, 256, 512),
    "gemma3-1b": _published(26, 1152, 6912, 4, 1, 256, 512),
    "gemma3-4b": _published(34, 2560, 10240, 8, 4, 256, 1024, **_LONG),
    "gemma3-12b": _published(48, 3840, 15360, 16, 8, 256, 1024, **_LONG),
    "gemma3-27b": _published(62, 5376, 21504, 32, 16, 128, 1024, query_pre_attn_scalar=168.0, **_LONG),
}


def variant(name: str) -> Gemma3Config:
    """The config of a published Gemma 3 size, by name (e.g. "gemma3-1b" or "1b")."""
    key = name if name.startswith("gemma3-") else f"gemma3-{name}"
    if key not in VARIANTS:
        raise GemstillError(f"unknown Gemma 3 variant {name!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[key]
