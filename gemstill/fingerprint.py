"""Content fingerprints: what a teacher, a tokenizer or a file *is*, independent of where it came from."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gemstill.config import Gemma3Config


def bytes_fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(config: Gemma3Config, flat: Mapping[str, Any]) -> str:
    """sha256 over the config and every parameter's bytes (sorted by name): equal iff the same model."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name in sorted(flat):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(np.asarray(flat[name])).tobytes())
    return digest.hexdigest()[:16]
