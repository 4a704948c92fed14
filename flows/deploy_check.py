"""The build step of prefect.yaml: `prefect deploy` refuses deployments whose stores disagree.

Every deployment of a profile (its distill and its nightly flow) must name the same `store` parameter, so the
night reads what the pipeline wrote; a nightly deployment's store must be a local directory (the history is a
DuckDB file in it). A deployment of either flow without a store would fall back to the profile's own, relative to
wherever its worker runs: refused too. One line per problem, naming the deployment and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

FLOWS = {"flows/distill.py:distill": "distill", "flows/nightly.py:nightly_eval": "nightly"}


def problems(config: dict[str, Any]) -> list[str]:
    """What is wrong with the store parameters of a prefect.yaml's deployments (empty: nothing)."""
    import fsspec

    found: list[str] = []
    stores: dict[str, dict[str, str]] = {}  # profile -> {deployment name: store}
    for deployment in config.get("deployments") or []:
        flow = FLOWS.get(deployment.get("entrypoint", ""))
        if flow is None:
            continue
        name, parameters = deployment.get("name"), deployment.get("parameters") or {}
        store, profile = parameters.get("store"), parameters.get("profile")
        if not store:
            found.append(
                f"deployment {name}: no store parameter; give it the shared one (store: *store in prefect.yaml)"
            )
            continue
        if flow == "nightly" and fsspec.core.split_protocol(str(store))[0] not in (None, "file", "local"):
            found.append(f"deployment {name}: store {store} is not a local directory; the nightly history needs one")
        stores.setdefault(str(profile), {})[str(name)] = str(store)
    for profile, named in stores.items():
        if len(set(named.values())) > 1:
            listed = ", ".join(f"{name} -> {store}" for name, store in sorted(named.items()))
            found.append(
                f"profile {profile}: its deployments name different stores ({listed}); the nightly would not see "
                "what distill wrote: give them one store"
            )
    return found


def check_deployments(prefect_file: str = "prefect.yaml") -> dict[str, Any]:
    """A prefect.yaml build step: raise, naming every problem, before anything is deployed."""
    config = yaml.safe_load(Path(prefect_file).read_text())
    found = problems(config)
    if found:
        raise ValueError("gemstill deployment check: " + "; ".join(found))
    return {}
