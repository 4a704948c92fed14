"""What a stage function receives: its settings (a view of the profile restricted to what its key covers), its
inputs' directories, its work directory, a logger."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from gemstill.errors import GemstillError
from gemstill.pipeline.profile import Profile


class ProfileView:
    """A read-only view of a profile that lets a stage read only the settings its task declares (`reads`: dotted
    paths, the ones its cache key hashes) and what lies under them. Reading any other setting raises at once,
    naming the stage, the setting (down to the value read) and the fix, so a key can never miss what its stage
    reads."""

    __slots__ = ("_denied", "_node", "_path", "_reads", "_stage", "_task")

    def __init__(self, node: Any, reads: Iterable[str], stage: str, task: str, path: str = "", denied: bool = False):
        for name, value in (("_node", node), ("_path", path), ("_reads", tuple(reads)), ("_stage", stage)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_task", task)
        object.__setattr__(self, "_denied", denied)  # an undeclared section: any value read below it is refused

    def _refuse(self, path: str) -> GemstillError:
        return GemstillError(
            f"stage {self._stage} read the setting {path!r}, which its cache key does not cover; add '{path}' to "
            f"the reads of task {self._task}"
        )

    def __getattr__(self, name: str) -> Any:
        path = f"{self._path}.{name}" if self._path else name
        node = self._node
        if name.startswith("_") or not isinstance(node, BaseModel) or name not in type(node).model_fields:
            if self._denied:  # a method or property of an undeclared section reads all of it
                raise self._refuse(self._path)
            raise GemstillError(
                f"stage {self._stage} read {path!r} of its profile, which is not a setting it can read; read the "
                f"settings by name (add them to the reads of task {self._task})"
            )
        value = getattr(node, name)
        if not self._denied and any(path == read or path.startswith(read + ".") for read in self._reads):
            return value  # declared: the whole section below it is covered by the key
        partly = any(read.startswith(path + ".") for read in self._reads)
        if isinstance(value, BaseModel):  # a section: refuse (or allow) at the value actually read below it
            return ProfileView(value, self._reads, self._stage, self._task, path, denied=self._denied or not partly)
        if partly and value is None:
            return value  # an unset section part of which is declared: nothing below it to keep apart
        raise self._refuse(path)

    def __setattr__(self, name: str, value: Any) -> None:
        raise GemstillError(f"stage {self._stage} tried to change the setting {name!r}; a profile is read-only")

    def __repr__(self) -> str:
        return f"ProfileView({self._path or 'profile'} of stage {self._stage}, reads {list(self._reads)})"


def view(profile: Profile, reads: Iterable[str], stage: str, task: str) -> ProfileView:
    """The profile as stage `stage` (running `task`) may read it."""
    return ProfileView(profile, reads, stage, task)


@dataclasses.dataclass(frozen=True)
class StageContext:
    """A stage reads `profile` (a ProfileView of its declared settings), reads upstream artifacts from `inputs`,
    writes into `workdir`.

    `workdir` may hold partial work of an earlier, killed attempt at the same key: stages resume from it.
    """

    stage: str
    profile: ProfileView | Profile
    inputs: Mapping[str, Path]  # upstream task name -> its committed artifact directory (local)
    workdir: Path
    log: Callable[[str], None] = print
    input_keys: Mapping[str, str] = dataclasses.field(default_factory=dict)  # upstream stage name -> its key
    # mirror a finished piece of partial work (a file or directory under workdir) to the store now, so a run on
    # another machine resumes from it; a no-op when the store is the local directory the stage works in
    persist: Callable[[Path], None] = lambda path: None
    # how far the stage is, 0..1 (long loops report it; the Prefect task shows it as a progress artifact)
    progress: Callable[[float], None] = lambda fraction: None

    def training_data(self) -> Path:
        """The packed data a student trains on: the teacher's solutions where the pipeline has a
        teacher_generate stage upstream, else prepare_data's reference split."""
        return self.inputs.get("teacher_generate") or self.input("prepare_data")

    def input(self, task: str) -> Path:
        if task not in self.inputs:
            raise GemstillError(
                f"stage {self.stage} needs the output of a '{task}' stage; add it to the stage's needs in the pipeline"
            )
        return self.inputs[task]
