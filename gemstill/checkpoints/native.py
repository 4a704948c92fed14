"""gemstill's native checkpoint: config.json, an Orbax parameter tree (shardable on restore), tokenizer.model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gemstill.config import Gemma3Config
from gemstill.errors import GemstillError
from gemstill.fsutil import atomic_dir
from gemstill.params import check_finite, expected_shapes

FORMAT = "gemstill-native-1"


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _this_process_alone() -> dict[str, Any]:
    """Orbax options for a checkpoint this process reads or writes by itself, with host (numpy) arrays: in a
    multi-process run Orbax would otherwise wait at a barrier for processes that never come (a model is written
    by process 0 alone; a stage that only process 0 runs reads one)."""
    if jax.process_count() == 1:
        return {}
    me = jax.process_index()
    return {"multiprocessing_options": ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})}


def save_native(
    directory: str | Path, config: Gemma3Config, flat: dict[str, Any], tokenizer_model: bytes | None
) -> Path:
    """Write a complete checkpoint directory, atomically (readers never see a partial one)."""
    directory = Path(directory).absolute()
    with atomic_dir(directory) as tmp:
        write_native(tmp, config, flat, tokenizer_model)
    return directory


def write_native(directory: Path, config: Gemma3Config, flat: dict[str, Any], tokenizer_model: bytes | None) -> None:
    """The checkpoint's files into an existing (scratch) directory."""
    (directory / "config.json").write_text(json.dumps({"format": FORMAT, "model": config.to_dict()}, indent=2))
    with ocp.StandardCheckpointer(**_this_process_alone()) as checkpointer:
        checkpointer.save(Path(directory).absolute() / "params", _nest(dict(flat)))
        checkpointer.wait_until_finished()
    if tokenizer_model is not None:
        (directory / "tokenizer.model").write_bytes(tokenizer_model)


def read_native_config(directory: Path) -> Gemma3Config:
    path = directory / "config.json"
    if not path.is_file():
        raise GemstillError(f"orbax:{directory}: no config.json; point orbax: at a directory gemstill saved")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise GemstillError(f"orbax:{directory}: config.json is corrupt; re-save the checkpoint") from None
    if raw.get("format") != FORMAT:
        raise GemstillError(f"orbax:{directory}: format {raw.get('format')!r} is not {FORMAT!r}; re-save it")
    return Gemma3Config.from_dict(raw["model"])


def load_native(
    directory: str | Path, shardings: dict[str, jax.sharding.Sharding] | None = None
) -> tuple[Gemma3Config, dict[str, Any]]:
    """Config and flat parameters; with `shardings` (name -> sharding) each array is restored already sharded."""
    directory = Path(directory).absolute()
    config = read_native_config(directory)
    params_dir = directory / "params"
    if not params_dir.is_dir():
        raise GemstillError(f"orbax:{directory}: params/ missing; the checkpoint is incomplete, re-save it")
    shapes = expected_shapes(config)
    dtype = np.dtype(config.jnp_param_dtype)
    target = {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=(shardings or {}).get(name)) for name, shape in shapes.items()
    }
    try:
        alone = _this_process_alone() if shardings is None else {}  # global shardings: every process reads
        with ocp.StandardCheckpointer(**alone) as checkpointer:
            restored = checkpointer.restore(params_dir, _nest(target))
    except Exception as err:  # orbax/tensorstore raise many types on damaged data
        raise GemstillError(
            f"orbax:{directory}: parameters unreadable ({type(err).__name__}); the checkpoint is damaged, re-save it"
        ) from None
    flat = _flatten(restored)
    check_finite(flat, f"orbax:{directory}")
    return config, flat
