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


_SHA256_CACHE = "file-sha256.json"


def cached_file_sha256(path: Path, cache_dir: Path) -> str:
    """file_sha256, remembered in `cache_dir` by (absolute path, size, mtime): a checkpoint is hashed once per
    machine, and hashed again whenever it is replaced or touched."""
    import sys

    from gemstill.fsutil import atomic_write_bytes

    path = Path(path).resolve()
    stat = path.stat()
    entry = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}"
    cache_file = Path(cache_dir) / _SHA256_CACHE
    try:
        known = json.loads(cache_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        known = {}  # a missing or damaged cache only costs a rehash
    if entry in known:
        return known[entry]
    digest = file_sha256(path)
    known = {k: v for k, v in known.items() if not k.startswith(f"{path}\0")}  # forget the file's old versions
    known[entry] = digest
    try:
        atomic_write_bytes(cache_file, json.dumps(known, sort_keys=True).encode())
    except OSError as err:  # a read-only cache directory: hashing still works, only slower next time
        sys.stderr.write(f"warning: cannot write {cache_file} ({err}); checkpoints will be rehashed\n")
    return digest


def model_fingerprint(config: Gemma3Config, flat: Mapping[str, Any]) -> str:
    """sha256 over the config and every parameter's bytes (sorted by name): equal iff the same model."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name in sorted(flat):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(np.asarray(flat[name])).tobytes())
    return digest.hexdigest()[:16]
