"""Where the shipped YAML and problem files are found, installed or not.

A name (not a path) is looked up, in order: the directories in $GEMSTILL_PROFILES / $GEMSTILL_PIPELINES /
$GEMSTILL_PROBLEMS (os.pathsep-separated), then ./profiles, ./pipelines, ./problems of the working directory,
then the copies installed with the package (gemstill.profiles, ...), then a source checkout's own directories.
So a project's own profiles override the shipped ones, and `pip install .` works from any directory.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal

from gemstill.errors import GemstillError

Kind = Literal["profiles", "pipelines", "problems"]
_CHECKOUT = Path(__file__).resolve().parents[1]


def search_dirs(kind: Kind) -> list[Path]:
    dirs = [Path(p) for p in os.environ.get(f"GEMSTILL_{kind.upper()}", "").split(os.pathsep) if p]
    dirs.append(Path.cwd() / kind)
    spec = importlib.util.find_spec(f"gemstill.{kind}")  # None: a source tree on sys.path, not installed
    dirs += [Path(p) for p in spec.submodule_search_locations or []] if spec else []
    dirs.append(_CHECKOUT / kind)
    return list(dict.fromkeys(dirs))


def find_shipped(kind: Kind, file_name: str) -> Path:
    """The first `file_name` among `search_dirs(kind)`; one line naming where it looked when there is none."""
    for directory in search_dirs(kind):
        if (directory / file_name).is_file():
            return directory / file_name
    looked = ", ".join(str(d) for d in search_dirs(kind))
    raise GemstillError(
        f"no {kind[:-1]} '{Path(file_name).stem}': {file_name} is in none of {looked}; "
        f"check the name, or set $GEMSTILL_{kind.upper()} to its directory"
    )


def resolve_yaml(kind: Kind, name_or_path: str) -> Path:
    """A .yaml/.yml path as given; anything else names a shipped file `<name>.yaml`."""
    path = Path(name_or_path)
    return path if path.suffix in (".yaml", ".yml") else find_shipped(kind, f"{name_or_path}.yaml")


def resolve_problem_file(path: str | os.PathLike[str]) -> Path:
    """A problem file as given when it exists; `problems/NAME` otherwise means the shipped one."""
    given = Path(path)
    if given.exists() or given.parts[:1] != ("problems",) or len(given.parts) != 2:
        return given
    return find_shipped("problems", given.name)
