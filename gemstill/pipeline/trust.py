"""What a run started from a deployment may name: its code comes from the worker, never from run parameters.

Anyone allowed to start a deployment sets its parameters. So a deployment run (`restricted`) may use profiles
and pipelines only by name or by a path inside the configured directories (gemstill.shipped.search_dirs:
$GEMSTILL_PROFILES / $GEMSTILL_PIPELINES, ./profiles, ./pipelines, the shipped ones), custom task modules
only when the worker lists them in $GEMSTILL_TASK_MODULES (comma-separated modules or packages), and paths
(the store, data and problem files, the teacher checkpoint) other than the profile file's own only inside
$GEMSTILL_STORES and $GEMSTILL_DATA; each is checked before anything is read. Runs started by hand (the CLI, a
Python call) trust their caller, who can run any code anyway.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gemstill.errors import GemstillError
from gemstill.shipped import Kind, search_dirs

TASK_MODULES_ENV = "GEMSTILL_TASK_MODULES"


def check_configured_file(kind: Kind, path: Path) -> None:
    """Refuse a profile or pipeline file outside the directories the worker is configured with."""
    resolved = Path(path).resolve()
    dirs = search_dirs(kind)
    if not any(resolved.is_relative_to(d.resolve()) for d in dirs):
        raise GemstillError(
            f"{kind[:-1]} {path} is outside the configured directories ({', '.join(str(d) for d in dirs)}); a "
            f"deployment run may only use those: pass a name, or add its directory to $GEMSTILL_{kind.upper()} "
            "on the worker"
        )


def allowed_task_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(TASK_MODULES_ENV, "").split(",") if m.strip()]


def check_task_module(task: str) -> None:
    """Refuse a custom task whose module the worker does not list in $GEMSTILL_TASK_MODULES."""
    module = task.partition(":")[0]
    if not any(module == allowed or module.startswith(allowed + ".") for allowed in allowed_task_modules()):
        raise GemstillError(
            f"task '{task}' is refused: a deployment run imports only the custom task modules its worker allows; "
            f"set {TASK_MODULES_ENV}={module} in the worker's environment"
        )


STORES_ENV = "GEMSTILL_STORES"
DATA_ENV = "GEMSTILL_DATA"


def configured_roots(env_name: str, default: str) -> list[str]:
    """The roots a deployment run's paths may lie under: $env_name (os.pathsep-separated paths or URL prefixes),
    else `default` relative to the working directory."""
    given = [r for r in os.environ.get(env_name, "").split(os.pathsep) if r.strip()]
    return given or [str(Path.cwd() / default)]


def _inside(location: str, roots: list[str]) -> bool:
    if "://" in location:  # a URL store: under a configured URL prefix
        return any(location.rstrip("/").startswith(r.rstrip("/") + "/") or location == r for r in roots if "://" in r)
    resolved = Path(location).resolve()  # symlinks and .. followed: a path cannot step out of its root
    return any(resolved.is_relative_to(Path(r).resolve()) for r in roots if "://" not in r)


def path_settings(profile: Any) -> dict[str, list[str]]:
    """Every path a profile names that a run reads or writes: {setting: [paths]} (a glob's fixed part)."""
    found: dict[str, list[str]] = {"store": [profile.store]}
    if profile.data.source == "files" and profile.data.files is not None:
        found["data.files.paths"] = list(profile.data.files.paths)
    corpus = profile.evaluate.out_of_domain
    if corpus is not None and corpus.source == "files" and corpus.files is not None:
        found["evaluate.out_of_domain.files.paths"] = list(corpus.files.paths)
    found["reasoning.problems"] = [str(p) for p in profile.reasoning.problems]
    model = profile.teacher.model
    if model and ":" in model:  # gguf:PATH, hf:DIR, orbax:DIR (an alias names no path)
        found["teacher.model"] = [model.partition(":")[2]]
    return found


def _fixed_part(pattern: str) -> str:
    """The directory a glob pattern cannot leave: its path up to the first wildcard."""
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))]]
    return str(Path(*fixed)) if fixed else "."


def check_paths(trusted: Any, requested: Any) -> None:
    """Refuse, before anything is read, a path a deployment run's parameters point outside the configured roots.

    `trusted` is the profile as its file says (a configured file: its paths are the deployer's), `requested` the
    profile with the run's store and overrides. A path the run did not change is the file's own; any other must
    lie under $GEMSTILL_STORES (stores; default ./runs) or $GEMSTILL_DATA (data, problem and checkpoint files;
    default ./data; the configured problem directories too)."""
    from gemstill.shipped import search_dirs

    before = path_settings(trusted)
    for setting, paths in path_settings(requested).items():
        if paths == before.get(setting):
            continue
        if setting == "store":
            roots, env_name = configured_roots(STORES_ENV, "runs"), STORES_ENV
        else:
            roots, env_name = configured_roots(DATA_ENV, "data"), DATA_ENV
            if setting == "reasoning.problems":
                roots += [str(d) for d in search_dirs("problems")]
        for path in paths:
            if not _inside(_fixed_part(path) if "files.paths" in setting else path, roots):
                raise GemstillError(
                    f"{setting}: {path} is outside the configured roots ({', '.join(roots)}); a deployment run may "
                    f"only point there: choose a path inside them, or add its directory to ${env_name} on the worker"
                )
