"""What a run started from a deployment may name: its code comes from the worker, never from run parameters.

Anyone allowed to start a deployment sets its parameters. So a deployment run (`restricted`) may use profiles
and pipelines only by name or by a path inside the configured directories (gemstill.shipped.search_dirs:
$GEMSTILL_PROFILES / $GEMSTILL_PIPELINES, ./profiles, ./pipelines, the shipped ones), and custom task modules
only when the worker lists them in $GEMSTILL_TASK_MODULES (comma-separated modules or packages). Runs started by
hand (the CLI, a Python call) trust their caller, who can run any code anyway.
"""

from __future__ import annotations

import os
from pathlib import Path

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
