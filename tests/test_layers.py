"""The house's floors: every gemstill module (the core library, kernels, Prefect tasks and flows) sits on one floor
and imports only from its own floor or below, and the import graph has no cycle. The graph is the one the stage
keys hash (gemstill.pipeline.code_version: imports at the top of a module and inside functions alike)."""

from __future__ import annotations

import fnmatch
import importlib.util
from pathlib import Path

from gemstill.pipeline.code_version import module_imports

# lowest first; a module may import from its own floor and the floors below it
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "base",
        (
            "gemstill",
            "gemstill.errors",
            "gemstill.fsutil",
            "gemstill.logs",
            "gemstill.read_ahead",
            "gemstill.shipped",
            "gemstill.config",
            "gemstill.layout",
            "gemstill.fingerprint",
            "gemstill.distributed",
            "gemstill.plots",
            "gemstill.launch",
            "gemstill.interrupt",
            "gemstill.wire",
            "gemstill.intervals",
        ),
    ),
    ("kernels", ("gemstill.kernels", "gemstill.kernels.*")),
    ("quantizer codec", ("gemstill.quant", "gemstill.quant.codec", "gemstill.quant.packed")),
    ("model", ("gemstill.model", "gemstill.sampler", "gemstill.scoring")),
    (
        "weights and checkpoints",
        (
            "gemstill.params",
            "gemstill.checkpoints",
            "gemstill.checkpoints.*",
            "gemstill.quant.weights",
            "gemstill.tokenizer",
            "gemstill.loading",
            "gemstill.memory",
            "gemstill.model_info",
            "gemstill.export",
        ),
    ),
    ("data", ("gemstill.data", "gemstill.data.*")),
    ("teacher cache", ("gemstill.teacher_cache", "gemstill.teacher_cache.*")),
    ("distillation", ("gemstill.distill", "gemstill.distill.*", "gemstill.pretrain")),
    ("reasoning", ("gemstill.reasoning", "gemstill.reasoning.*")),
    ("pipeline", ("gemstill.pipeline", "gemstill.pipeline.*")),
    ("nightly", ("gemstill.nightly", "gemstill.nightly.*")),
    ("prefect tasks", ("gemstill.tasks", "gemstill.tasks.*")),
    ("prefect flows", ("gemstill.flows", "gemstill.flows.*")),
    ("command line", ("gemstill.cli", "gemstill.cli.*", "gemstill.__main__")),
)
PACKAGES = ("gemstill", "gemstill.kernels", "gemstill.tasks", "gemstill.flows")


def all_modules() -> list[str]:
    """Every source module of the installed packages (gemstill.kernels/tasks/flows are installed from kernels/,
    tasks/ and flows/)."""
    names = set()
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations, package
        (root,) = [Path(p) for p in spec.submodule_search_locations]
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if package == "gemstill" and parts and parts[0] in ("kernels", "tasks", "flows"):
                continue  # not a package of gemstill's own directory
            names.add(".".join((package, *parts)))
    return sorted(names)


def floor_of(module: str) -> int:
    matches = [i for i, (_, patterns) in enumerate(FLOORS) if any(fnmatch.fnmatchcase(module, p) for p in patterns)]
    assert len(matches) == 1, f"{module} belongs to {len(matches)} floors; place it on exactly one in FLOORS"
    return matches[0]


def test_every_import_stays_on_its_floor_or_goes_down():
    """Importing a module runs its packages' __init__ files too: they count as its imports here, so a package
    __init__ that imported something above the package's lowest module would show as an upward import."""
    modules = all_modules()
    assert "gemstill.model" in modules and "gemstill.flows.distill" in modules and len(modules) > 100
    upward = []
    for module in modules:
        parents = {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}
        for imported in module_imports(module) | parents:
            if floor_of(imported) > floor_of(module):
                upward.append(
                    f"{module} ({FLOORS[floor_of(module)][0]}) imports {imported} ({FLOORS[floor_of(imported)][0]})"
                )
    assert not upward, "imports from a lower floor to a higher one:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    graph = {module: module_imports(module) for module in all_modules()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checks_can_fail():
    """The cycle finder finds a planted cycle, and an upward edge is caught by the floor order."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert floor_of("gemstill.model") < floor_of("gemstill.params") < floor_of("gemstill.pipeline.plan")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found
