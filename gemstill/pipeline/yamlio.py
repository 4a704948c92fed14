"""Reading YAML into pydantic models with one-line errors that name the file and the offending key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from gemstill.errors import GemstillError

Model = TypeVar("Model", bound=pydantic.BaseModel)


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice (PyYAML keeps the last one silently)."""


def _mapping(loader: _UniqueKeys, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=True)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_yaml(text: str) -> Any:
    """YAML text to data, refusing duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeys)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise GemstillError(f"{path}: file not found; check the name (profiles/ and pipelines/ hold the shipped ones)")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise GemstillError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise GemstillError(f"{path}: invalid YAML{where} ({problem}); fix the syntax") from None
    if not isinstance(data, dict):
        raise GemstillError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def validate(model: type[Model], data: dict[str, Any], path: Path | str) -> Model:
    """model.model_validate(data), turning the first validation error into one line naming the key."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        if first["type"] == "extra_forbidden":
            raise GemstillError(f"{path}: unknown key '{key}'; remove it or fix its spelling") from None
        if first["type"] == "missing":
            raise GemstillError(f"{path}: missing required key '{key}'") from None
        raise GemstillError(f"{path}: key '{key}': {first['msg']} (got {first.get('input')!r})") from None
