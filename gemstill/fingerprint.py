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
    """file_sha256, remembered in `cache_dir` by (absolute path, size, mtime, ctime): a checkpoint is hashed once
    per machine, and hashed again whenever it is replaced, touched or written to."""
    return cached_file_sha256s([path], cache_dir)[0]


def _entry(path: Path) -> str:
    stat = path.stat()  # ctime too: no user can set it, and any write to the file moves it
    return f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}"


def _read_cache(cache_file: Path) -> dict[str, str]:
    try:
        known = json.loads(cache_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # a missing or damaged cache only costs a rehash
    return known if isinstance(known, dict) else {}


def _write_cache(cache_file: Path, known: dict[str, str]) -> None:
    """Write the cache, dropping the files that are gone (temporary stores come and go)."""
    import os
    import sys

    from gemstill.fsutil import atomic_write_bytes

    known = {k: v for k, v in known.items() if os.path.exists(k.split("\0", 1)[0])}
    try:
        atomic_write_bytes(cache_file, json.dumps(known, sort_keys=True).encode())
    except OSError as err:  # a read-only cache directory: hashing still works, only slower next time
        sys.stderr.write(f"warning: cannot write {cache_file} ({err}); files will be rehashed\n")


def cached_file_sha256s(paths: list[Path], cache_dir: Path) -> list[str]:
    """cached_file_sha256 of many files, reading and writing the cache once."""
    cache_file = Path(cache_dir) / _SHA256_CACHE
    known = _read_cache(cache_file)
    entries = [_entry(Path(path).resolve()) for path in paths]
    missing = {entry: Path(entry.split("\0", 1)[0]) for entry in entries if entry not in known}
    if missing:
        known = _forget(known, set(missing.values()))
        known.update({entry: file_sha256(path) for entry, path in missing.items()})
        _write_cache(cache_file, known)
    return [known[entry] for entry in entries]


def remember_sha256s(digests: Mapping[Path, str], cache_dir: Path) -> None:
    """Record files' sha256 just computed (a store's commit), so verifying them later reads no byte."""
    cache_file = Path(cache_dir) / _SHA256_CACHE
    resolved = {Path(path).resolve(): digest for path, digest in digests.items()}
    known = _forget(_read_cache(cache_file), set(resolved))
    known.update({_entry(path): digest for path, digest in resolved.items()})
    _write_cache(cache_file, known)


def _forget(known: dict[str, str], paths: set[Path]) -> dict[str, str]:
    """The cache without any version of these files (a file's old versions are never looked up again)."""
    names = {str(path) for path in paths}
    return {k: v for k, v in known.items() if k.split("\0", 1)[0] not in names}


def model_fingerprint(config: Gemma3Config, flat: Mapping[str, Any]) -> str:
    """sha256 over the config and every parameter's bytes (sorted by name): equal iff the same model."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name in sorted(flat):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(np.asarray(flat[name])).tobytes())
    return digest.hexdigest()[:16]
