"""The artifact store: `<root>/<stage>/<key>/` per stage run, with a manifest written last meaning "done".

The root is a local directory or any fsspec URL. Stages always work in a local directory: the store's own
directory when it is local, otherwise a local staging copy. With a remote store, partial work reaches the store
as it is made (a stage persists each teacher-cache shard and each checkpoint as it completes), a run that finds
partial work of a killed attempt in the store downloads it before it starts (so it resumes on any machine),
and commit uploads the rest, files first and the manifest last. A committed manifest is visible to every
process and machine that sees the store.

A refresh recomputes beside the committed result, in `<key>.refresh/`, and swaps on commit: until the new
result is complete the old one stays done, and a refresh that fails leaves it untouched. A swap cut short
(the process killed between the two steps) is finished by the next reader. `<key>.lease` holds the lease of
the run computing the key (gemstill.pipeline.lease).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import fsspec

from gemstill.errors import GemstillError
from gemstill.fingerprint import file_sha256
from gemstill.fsutil import atomic_write_bytes

MANIFEST = "manifest.json"
REFRESH = ".refresh"  # suffix of the directory a refresh works in
OLD = ".old"  # suffix of the result a local swap is replacing
LEASE = ".lease"


class CorruptResult(GemstillError):
    """A committed result whose files do not match its manifest: never served; the stage must be recomputed."""

    def __init__(self, stage: str, key: str, problem: str, profile: str = "PROFILE") -> None:
        super().__init__(
            f"{problem}: the committed result of stage {stage} is corrupt; recompute it: gemstill run {profile} "
            f"--refresh {stage}"
        )
        self.stage, self.key, self.problem = stage, key, problem

    def naming(self, profile: str) -> CorruptResult:
        """The same error, its command naming the profile."""
        return CorruptResult(self.stage, self.key, self.problem, profile)


class ArtifactStore:
    def __init__(self, root: str, staging_root: Path | None = None):
        self.root = root
        try:
            self.fs, self.base = fsspec.core.url_to_fs(root)
        except (ImportError, ValueError) as err:
            raise GemstillError(f"store {root}: no filesystem for it ({err}); install its fsspec backend") from None
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_local = "file" in protocols
        if self.is_local and Path(self.base).exists() and not Path(self.base).is_dir():
            raise GemstillError(f"store {root}: a file, not a directory; give --store a directory (new or a store)")
        digest = hashlib.sha256(root.encode()).hexdigest()[:12]
        from gemstill.loading import cache_root

        self.staging = staging_root or cache_root() / "staging" / digest

    def _remote(self, stage: str, key: str, name: str = "") -> str:
        return "/".join(p for p in (self.base.rstrip("/"), stage, key, name) if p)

    def local_dir(self, stage: str, key: str) -> Path:
        """Where a committed stage's files can be read locally (for a remote store, once fetched)."""
        return self.work_dir(stage, key, refresh=False)

    def work_dir(self, stage: str, key: str, refresh: bool) -> Path:
        """Where a run of the stage works: the key's own directory, or beside it for a refresh."""
        name = key + (REFRESH if refresh else "")
        if self.is_local:
            return Path(self._remote(stage, name))
        return self.staging / stage / name

    def lease_path(self, stage: str, key: str) -> str:
        self.fs.makedirs(self._remote(stage, ""), exist_ok=True)
        return self._remote(stage, key + LEASE)

    def _read_manifest(self, stage: str, name: str) -> dict[str, Any] | None:
        try:
            with self.fs.open(self._remote(stage, name, MANIFEST), "rb") as handle:
                return json.loads(handle.read())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return None  # a torn manifest cannot exist (atomic writes), but never trust one

    def manifest(self, stage: str, key: str) -> dict[str, Any] | None:
        """The committed manifest of a stage run, or None; reading never moves or deletes anything (a refresh
        whose swap was cut short is finished by the next run of that stage, in finish_refresh)."""
        return self._read_manifest(stage, key)

    def finish_refresh(self, stage: str, key: str) -> None:
        """Put a committed refresh whose swap was cut short in place of the old result, once its files check out
        against its manifest (what the run that made it would have done); one that does not is left alone."""
        if self._read_manifest(stage, key + REFRESH) is None:
            return
        if self.is_local and (problem := self._check_files(self.work_dir(stage, key, refresh=True), stage, key)):
            raise GemstillError(
                f"store {self.root}: the refresh of {stage}/{key} that was cut short does not match its manifest "
                f"({problem}); remove {self._remote(stage, key + REFRESH)} and run the stage again"
            )
        self._finish_swap(stage, key)

    def verify(self, stage: str, key: str) -> str | None:
        """What is wrong with a committed local result against its manifest (a file missing, of another size or
        with other bytes), or None. sha256s are remembered per file (path, size, mtime, ctime), so a result is
        read in full only once per machine, and again whenever a file of it changes."""
        manifest = self.manifest(stage, key)
        if manifest is None or not self.is_local:
            return None
        return self._check_files(self.local_dir(stage, key), stage, key, manifest)

    def _check_files(self, directory: Path, stage: str, key: str, manifest: dict[str, Any] | None = None):
        from gemstill.fingerprint import cached_file_sha256s
        from gemstill.loading import cache_root

        if manifest is None:
            manifest = self._read_manifest(stage, key + REFRESH) or {}
        entries = manifest.get("files", [])
        for entry in entries:
            path = directory / entry["path"]
            if not path.is_file():
                return f"{stage}/{key}/{entry['path']} is missing"
            if path.stat().st_size != entry["bytes"]:
                return f"{stage}/{key}/{entry['path']} has {path.stat().st_size} bytes, its manifest {entry['bytes']}"
        digests = cached_file_sha256s([directory / e["path"] for e in entries], cache_root())
        for entry, digest in zip(entries, digests, strict=True):
            if digest != entry["sha256"]:
                return f"{stage}/{key}/{entry['path']} has other bytes than its manifest records (sha256 {digest[:12]})"
        return None

    def keys(self, stage: str) -> list[str]:
        """Keys of every committed run of a stage (any config, any code version)."""
        try:
            entries = self.fs.ls(self._remote(stage, ""), detail=False)
        except FileNotFoundError:
            return []
        keys = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return [k for k in keys if "." not in k and self.fs.exists(self._remote(stage, k, MANIFEST))]

    def prepare(self, stage: str, key: str, refresh: bool) -> Path:
        """The local work directory: partial work of an earlier attempt is kept for resuming, except that a
        refresh starts from nothing (beside the committed result, which stays done until the swap)."""
        workdir = self.work_dir(stage, key, refresh)
        if refresh:
            if workdir.exists():
                shutil.rmtree(workdir)
            if not self.is_local and self.fs.exists(self._remote(stage, key + REFRESH)):
                self.fs.rm(self._remote(stage, key + REFRESH), recursive=True)
        workdir.mkdir(parents=True, exist_ok=True)
        if not refresh and not self.is_local:
            self._download_partial(stage, key, workdir)
        return workdir

    def join(self, stage: str, key: str, refresh: bool) -> Path:
        """The work directory process 0 of a multi-process run prepared, which every process writes in (the store
        is a directory they all see: gemstill.pipeline.plan refuses any other in such a run)."""
        workdir = self.work_dir(stage, key, refresh)
        workdir.mkdir(parents=True, exist_ok=True)
        return workdir

    def persist(self, stage: str, key: str, refresh: bool, path: Path) -> None:
        """Mirror a file or directory of the work directory to the store now (a no-op for a local store, where the
        work directory is the store). A directory is synced: files gone locally (pruned checkpoints) go remotely,
        and Orbax's unfinished `*tmp*` directories are left out."""
        if self.is_local:
            return
        name = key + (REFRESH if refresh else "")
        workdir = self.work_dir(stage, key, refresh)
        path = Path(path)
        local = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        local = [p for p in local if not any("tmp" in part for part in p.relative_to(workdir).parts)]
        wanted = {str(p.relative_to(workdir)): p for p in local}
        prefix = self._remote(stage, name, str(path.relative_to(workdir)))
        for relative, file in wanted.items():
            target = self._remote(stage, name, relative)
            unchanged = self.fs.exists(target) and self.fs.size(target) == file.stat().st_size
            if path.is_file() or not unchanged:  # a named file may change in place; a checkpoint never does
                self.fs.put_file(str(file), target)
        if path.is_dir() and self.fs.exists(prefix):
            base = self._remote(stage, name, "")
            for remote in self.fs.find(prefix):
                if remote.removeprefix(base).lstrip("/") not in wanted:
                    self.fs.rm(remote)

    def _download_partial(self, stage: str, name: str, workdir: Path) -> int:
        """Fetch the partial work a killed attempt left in the store into `workdir`; the number of files."""
        base = self._remote(stage, name, "")
        if not self.fs.exists(base):
            return 0
        fetched = 0
        for remote in self.fs.find(base):
            relative = remote.removeprefix(base).lstrip("/")
            if relative == MANIFEST or relative.startswith("."):
                continue
            target = workdir / relative
            if target.is_file() and target.stat().st_size == self.fs.size(remote):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(remote, str(target))
            fetched += 1
        return fetched

    def commit(self, stage: str, key: str, record: dict[str, Any], refresh: bool = False) -> dict[str, Any]:
        """Checksum the work directory's files, upload them if remote, then write the manifest last; a refresh
        then swaps its result in place of the old one."""
        name = key + (REFRESH if refresh else "")
        workdir = self.work_dir(stage, key, refresh)
        files, digests = [], {}
        for path in sorted(p for p in workdir.rglob("*") if p.is_file() and p.name != MANIFEST):
            digests[path] = file_sha256(path)
            files.append(
                {"path": str(path.relative_to(workdir)), "bytes": path.stat().st_size, "sha256": digests[path]}
            )
        manifest = {**record, "files": files}
        payload = json.dumps(manifest, indent=2, sort_keys=True).encode()
        if self.is_local:
            atomic_write_bytes(workdir / MANIFEST, payload)
        else:
            for entry in files:
                self.fs.put_file(str(workdir / entry["path"]), self._remote(stage, name, entry["path"]))
            base, kept = self._remote(stage, name, ""), {entry["path"] for entry in files}
            for remote in self.fs.find(base):  # partial work the result no longer holds (pruned checkpoints)
                if remote.removeprefix(base).lstrip("/") not in kept:
                    self.fs.rm(remote)
            self._write_remote_manifest(stage, name, payload)
        if refresh:
            self._finish_swap(stage, key)
        if self.is_local:  # what the store's checks later compare against, where it now lies: not read again
            from gemstill.fingerprint import remember_sha256s
            from gemstill.loading import cache_root

            final = self.local_dir(stage, key)
            remember_sha256s({final / p.relative_to(workdir): d for p, d in digests.items()}, cache_root())
        return manifest

    def _write_remote_manifest(self, stage: str, name: str, payload: bytes) -> None:
        partial = self._remote(stage, name, f".{MANIFEST}.partial")
        self.fs.pipe_file(partial, payload)
        self.fs.mv(partial, self._remote(stage, name, MANIFEST))

    def _finish_swap(self, stage: str, key: str) -> None:
        """Put a committed refresh in place of the key's old result (idempotent: a cut-short swap is redone)."""
        fresh, target = self._remote(stage, key + REFRESH), self._remote(stage, key)
        if self.is_local:
            old = Path(self._remote(stage, key + OLD))
            shutil.rmtree(old, ignore_errors=True)
            try:
                if Path(target).exists():
                    os.replace(target, old)
                os.replace(fresh, target)
            except FileNotFoundError:
                if self._read_manifest(stage, key) is None:
                    raise  # not a concurrent reader finishing the same swap first
            shutil.rmtree(old, ignore_errors=True)
            return
        manifest = self._read_manifest(stage, key + REFRESH)
        if manifest is None:
            return  # another process finished this swap
        if self.fs.exists(self._remote(stage, key, MANIFEST)):
            self.fs.rm(self._remote(stage, key, MANIFEST))  # first: the key reads missing, never half-swapped
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)
        for entry in manifest["files"]:
            self.fs.copy(f"{fresh}/{entry['path']}", f"{target}/{entry['path']}")
        self._write_remote_manifest(stage, key, json.dumps(manifest, indent=2, sort_keys=True).encode())
        self.fs.rm(fresh, recursive=True)
        staged = self.work_dir(stage, key, refresh=True)
        if staged.exists():
            shutil.rmtree(self.local_dir(stage, key), ignore_errors=True)
            os.replace(staged, self.local_dir(stage, key))

    def fetch(self, stage: str, key: str) -> Path:
        """A local directory holding a committed stage's files (downloaded and verified if the store is remote)."""
        manifest = self.manifest(stage, key)
        if manifest is None:
            raise GemstillError(f"stage {stage} ({key}) is not done in store {self.root}; run it first")
        local = self.local_dir(stage, key)
        if self.is_local:
            if (problem := self.verify(stage, key)) is not None:
                raise CorruptResult(stage, key, problem)
            return local
        for entry in manifest["files"]:
            target = local / entry["path"]
            if target.is_file() and file_sha256(target) == entry["sha256"]:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._remote(stage, key, entry["path"]), str(target))
            if file_sha256(target) != entry["sha256"]:
                raise CorruptResult(stage, key, f"{stage}/{key}/{entry['path']} fails its checksum")
        return local
