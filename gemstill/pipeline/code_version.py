"""A stage's code version: the source of every gemstill module its task can import, and the numerics libraries.

Why the import graph and not the whole package's source: hashing everything would make an edit to the CLI, the
nightly flow or the export code recompute a trained student, so people would learn to distrust the keys. The
graph is read from the source with `ast`, imports at the top of a module and inside functions alike, so it
covers everything the task can reach whether or not this process has imported it yet, and it does not depend
on import order. It starts from the stage function: its module's source counts whole, but only the imports
the function (and the module's functions it names) can run are followed, so the stages that share a module do
not share each other's imports. Package `__init__` files on the way are part of it (they hold the version).
A module reached only by a name computed at run time is not an edge; the one such import, a custom task's
module, is a root.

Dependency versions are part of it too: a new jax or flax can change a number in every stage.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import threading
import time
from importlib.metadata import PackageNotFoundError, distributions, version
from pathlib import Path

PACKAGE = "gemstill"
# the libraries whose versions can change what a stage computes (kernels, initializers, optimizers, file formats)
NUMERICS = ("jax", "jaxlib", "flax", "optax", "numpy", "ml-dtypes", "orbax-checkpoint", "sentencepiece", "gguf")
# accelerator plugins change numerics as much as jaxlib itself
_PLUGIN_PREFIXES = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


@functools.cache
def _source_file(name: str) -> tuple[Path, bool] | None:
    """(the module's .py file, whether it is a package), or None when `name` is not a Python source module."""
    parent = name.rpartition(".")[0]
    if parent:
        found = _source_file(parent)
        if found is None or not found[1]:
            return None  # the parent is no package, so `name` is an attribute, not a module
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin), spec.submodule_search_locations is not None


def _import_names(node: ast.AST, module: str, is_package: bool) -> set[str]:
    """The module names the import statements under `node` could refer to (candidates, unresolved)."""
    names: set[str] = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Import):
            names.update(alias.name for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            if child.level:  # relative: from the module's own package, up level - 1 more
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(child.level - 1):
                    package = package.rpartition(".")[0]
                base = ".".join(p for p in (package, child.module or "") if p)
            else:
                base = child.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in child.names)  # `from pkg import module`
    return names


_PARSE_LOCK = threading.Lock()


@functools.cache
def _parsed(name: str) -> tuple[ast.Module, bool] | None:
    """The module's syntax tree. CPython 3.11's AST constructor keeps its recursion depth in global state, so two
    threads parsing at once (ours or a library's) can fail with "SystemError: AST constructor recursion depth
    mismatch": parse under a lock, and parse again if another thread's parse got in the way."""
    found = _source_file(name)
    if found is None:
        return None
    path, is_package = found
    source = path.read_bytes()
    for attempt in range(5):
        try:
            with _PARSE_LOCK:
                return ast.parse(source, filename=str(path)), is_package
        except SystemError:
            if attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _imported_names(name: str, function: str | None = None) -> set[str]:
    """What a module can import; for `function`, only what that function can: the module's top-level imports and
    those inside the function and inside the module's functions and classes it names, transitively."""
    parsed = _parsed(name)
    if parsed is None:
        return set()
    tree, is_package = parsed
    if function is None:
        return _import_names(tree, name, is_package)
    defined = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
    top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = set().union(*(_import_names(n, name, is_package) for n in top_level))
    reached: set[str] = set()
    pending = [function]
    while pending:
        current = pending.pop()
        if current in reached or current not in defined:
            continue
        reached.add(current)
        names |= _import_names(defined[current], name, is_package)
        pending += [n.id for n in ast.walk(defined[current]) if isinstance(n, ast.Name) and n.id in defined]
    return names


def _ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def module_closure(roots: tuple[str, ...]) -> list[str]:
    """The roots and every gemstill module reachable from them by imports, with their parent packages.

    A root is a module, or "module:function": then the module's source counts whole, but only what the function
    can reach is followed (so the stages that share a module do not share each other's imports).
    """
    seen: set[str] = set()
    pending: list[str] = []
    for root in roots:
        module, _, function = root.partition(":")
        if _source_file(module) is not None:
            seen.add(module)
            pending += [n for n in _imported_names(module, function or None) if _ours(n)]
            pending += [p for p in _parents(module) if _ours(p)]
    while pending:
        name = pending.pop()
        if name in seen or _source_file(name) is None:
            continue
        seen.add(name)
        pending += [p for p in _parents(name) if _ours(p)]
        pending += [n for n in _imported_names(name) if _ours(n) and n not in seen]
    return sorted(seen)


def module_imports(name: str) -> set[str]:
    """The gemstill source modules `name` imports directly (at the top or inside functions): one module's edges of
    the graph the keys hash, read the same way (tests/test_layers.py holds the house to its floors with it)."""
    return {n for n in _imported_names(name) if _ours(n) and n != name and _source_file(n) is not None}


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def read_source(name: str) -> bytes:
    found = _source_file(name)
    assert found is not None, name  # module_closure keeps only source modules
    return found[0].read_bytes()


@functools.lru_cache(maxsize=1)
def dependency_versions() -> dict[str, str | None]:
    """Installed versions of the numerics libraries and of any JAX accelerator plugin."""
    found: dict[str, str | None] = {}
    for name in NUMERICS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    for dist in distributions():
        dist_name = dist.metadata["Name"] or ""
        if dist_name.lower().startswith(_PLUGIN_PREFIXES):
            found[dist_name.lower()] = dist.version
    return found


def code_version(roots: tuple[str, ...]) -> str:
    """sha256 over the import closure's sources (by module name) and the numerics libraries' versions."""
    digest = hashlib.sha256(json.dumps(dependency_versions(), sort_keys=True).encode())
    for name in module_closure(roots):
        source = read_source(name)
        digest.update(f"{name}\0{len(source)}\0".encode())
        digest.update(source)
    return digest.hexdigest()[:16]
