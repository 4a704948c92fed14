"""The artifact store: `<root>/<stage>/<key>/` per stage run, with a manifest written last meaning "done".

The root is a local directory or any fsspec URL. Stages always work in a local directory: the store's own
directory when it is local, otherwise a local staging copy that is uploaded (files first, manifest last) on
commit. A committed manifest is visible to every process and machine that sees the store.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import fsspec

from gemstill.errors import GemstillError
from gemstill.fingerprint import file_sha256
from gemstill.fsutil import atomic_write_bytes

MANIFEST = "manifest.json"


class ArtifactStore:
    def __init__(self, root: str, staging_root: Path | None = None):
        self.root = root
        try:
            self.fs, self.base = fsspec.core.url_to_fs(root)
        except (ImportError, ValueError) as err:
            raise GemstillError(f"store {root}: no filesystem for it ({err}); install its fsspec backend") from None
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_local = "file" in protocols
        digest = hashlib.sha256(root.encode()).hexdigest()[:12]
        from gemstill.loading import cache_root

        self.staging = staging_root or cache_root() / "staging" / digest

    def _remote(self, stage: str, key: str, name: str = "") -> str:
        return "/".join(p for p in (self.base.rstrip("/"), stage, key, name) if p)

    def local_dir(self, stage: str, key: str) -> Path:
        """Where the stage works (and where its committed files can be read locally)."""
        if self.is_local:
            return Path(self._remote(stage, key))
        return self.staging / stage / key

    def manifest(self, stage: str, key: str) -> dict[str, Any] | None:
        path = self._remote(stage, key, MANIFEST)
        try:
            with self.fs.open(path, "rb") as handle:
                return json.loads(handle.read())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return None  # a torn manifest cannot exist (atomic writes), but never trust one

    def keys(self, stage: str) -> list[str]:
        """Keys of every committed run of a stage (any config, any code version)."""
        try:
            entries = self.fs.ls(self._remote(stage, ""), detail=False)
        except FileNotFoundError:
            return []
        keys = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return [k for k in keys if self.fs.exists(self._remote(stage, k, MANIFEST))]

    def prepare(self, stage: str, key: str, fresh: bool) -> Path:
        """The local work directory; `fresh` clears partial work (a refresh), otherwise it is kept for resuming."""
        self.invalidate(stage, key)
        workdir = self.local_dir(stage, key)
        if fresh and workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        return workdir

    def invalidate(self, stage: str, key: str) -> None:
        """Remove the manifest, so a half-refreshed directory never reads as done."""
        path = self._remote(stage, key, MANIFEST)
        if self.fs.exists(path):
            self.fs.rm(path)

    def commit(self, stage: str, key: str, record: dict[str, Any]) -> dict[str, Any]:
        """Checksum the work directory's files, upload them if remote, then write the manifest last."""
        workdir = self.local_dir(stage, key)
        files = []
        for path in sorted(p for p in workdir.rglob("*") if p.is_file() and p.name != MANIFEST):
            files.append(
                {"path": str(path.relative_to(workdir)), "bytes": path.stat().st_size, "sha256": file_sha256(path)}
            )
        manifest = {**record, "files": files}
        payload = json.dumps(manifest, indent=2, sort_keys=True).encode()
        if self.is_local:
            atomic_write_bytes(workdir / MANIFEST, payload)
        else:
            for entry in files:
                self.fs.put_file(str(workdir / entry["path"]), self._remote(stage, key, entry["path"]))
            partial = self._remote(stage, key, f".{MANIFEST}.partial")
            self.fs.pipe_file(partial, payload)
            self.fs.mv(partial, self._remote(stage, key, MANIFEST))
        return manifest

    def fetch(self, stage: str, key: str) -> Path:
        """A local directory holding a committed stage's files (downloaded and verified if the store is remote)."""
        manifest = self.manifest(stage, key)
        if manifest is None:
            raise GemstillError(f"stage {stage} ({key}) is not done in store {self.root}; run it first")
        local = self.local_dir(stage, key)
        if self.is_local:
            return local
        for entry in manifest["files"]:
            target = local / entry["path"]
            if target.is_file() and file_sha256(target) == entry["sha256"]:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._remote(stage, key, entry["path"]), str(target))
            if file_sha256(target) != entry["sha256"]:
                raise GemstillError(f"store {self.root}: {stage}/{key}/{entry['path']} fails its checksum; refresh it")
        return local
