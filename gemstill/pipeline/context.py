"""What a stage function receives: its settings, its inputs' directories, its work directory, a logger."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gemstill.errors import GemstillError
from gemstill.pipeline.profile import Profile


@dataclasses.dataclass(frozen=True)
class StageContext:
    """A stage reads `profile`/`settings`, reads upstream artifacts from `inputs`, writes into `workdir`.

    `workdir` may hold partial work of an earlier, killed attempt at the same key: stages resume from it.
    """

    stage: str
    profile: Profile
    settings: Mapping[str, Any]  # exactly what the stage's cache key hashes
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
