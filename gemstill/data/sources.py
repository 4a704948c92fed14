"""Local data files (JSON lines, parquet, plain text) read through `datasets`, offline, into examples.

An example is either a plain text or a chat: a list of {"role", "content"} messages.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gemstill.data.config import FilesConfig
from gemstill.errors import GemstillError

Example = str | list[dict[str, str]]
_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text"}


def resolve_paths(patterns: list[str]) -> list[str]:
    """Every file the paths and globs name, sorted within a pattern, each once, in the order given."""
    files: dict[str, None] = {}
    for pattern in patterns:
        matches = sorted(m for m in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(m).is_file())
        if not matches:
            raise GemstillError(f"data.files.paths: no file matches {pattern!r}; check the path or the glob")
        files.update(dict.fromkeys(matches))
    return list(files)


def infer_format(files: list[str], configured: str | None) -> str:
    """The `datasets` builder for the files: the configured format, else the one their extensions share."""
    if configured is not None:
        return configured
    formats = set()
    for file in files:
        suffix = Path(file).suffix.lower()
        if suffix not in _FORMATS:
            raise GemstillError(
                f"cannot tell the format of {file} from its extension; set data.files.format to json, parquet or text"
            )
        formats.add(_FORMATS[suffix])
    if len(formats) > 1:
        raise GemstillError(
            f"data.files.paths mix formats ({', '.join(sorted(formats))}); give files of one format per run"
        )
    return formats.pop()


def load_file_examples(config: FilesConfig, scratch_dir: Path) -> list[Example]:
    """The examples in the configured files; `datasets` caches into a temporary directory under `scratch_dir`.

    Plain-text files give one example per paragraph (blank-line separated). Empty texts are dropped.
    """
    files = resolve_paths(config.paths)
    builder = infer_format(files, config.format)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read at import: local files only, never the Hub
    import datasets

    field = config.messages_field or config.text_field
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    scratch_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".datasets-", dir=scratch_dir) as cache_dir:
        try:
            dataset = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **kwargs)
        except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as err:
            reason = " ".join(str(err.__cause__ or err).split())[:300]
            raise GemstillError(
                f"cannot read {files[0]} as {builder} ({reason}); check the files or data.files.format"
            ) from None
        if field not in dataset.column_names:
            option = "messages_field" if config.messages_field else "text_field"
            raise GemstillError(
                f"field {field!r} is not in {_describe(files)} (columns: {', '.join(dataset.column_names)}); "
                f"set data.files.{option} to one of them"
            )
        values = dataset[field]
    if config.messages_field:
        examples: list[Example] = [_messages(value, row, field) for row, value in enumerate(values)]
    else:
        examples = [_text(value, row, field) for row, value in enumerate(values)]
        examples = [text for text in examples if text.strip()]
    if not examples:
        raise GemstillError(f"no examples in {_describe(files)}: the {field!r} values are all empty; add data")
    return examples


def _describe(files: list[str]) -> str:
    return files[0] if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more files)"


def _text(value: Any, row: int, field: str) -> str:
    if not isinstance(value, str):
        raise GemstillError(
            f"row {row}: {field!r} is {type(value).__name__}, not text; point text_field at a text column"
        )
    return value


def _messages(value: Any, row: int, field: str) -> list[dict[str, str]]:
    """A chat as a list of {role, content} strings; turn order is checked when it is formatted."""
    if not isinstance(value, list) or not value:
        raise GemstillError(
            f"row {row}: {field!r} is not a non-empty list of messages; give [{{'role': ..., 'content': ...}}, ...]"
        )
    for message in value:
        if not isinstance(message, Mapping) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            raise GemstillError(
                f"row {row}: {field!r} has a message without string 'role' and 'content' ({message!r:.80}); "
                "give each message as {'role': 'user' | 'model', 'content': text}"
            )
    return [{"role": message["role"], "content": message["content"]} for message in value]
