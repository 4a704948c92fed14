"""English prose every machine has: the docstrings of the Python standard library, as a text corpus.

A real-language corpus that needs no download, for distilling a real teacher on text in its own domain (the
generated arithmetic corpus is far from what a base model was trained on). The text depends on the Python
version, which is why the prepare_data stage's key includes it for this source.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path


def stdlib_documents(min_chars: int = 200, max_documents: int | None = None) -> list[str]:
    """Module, class and function docstrings of the top-level stdlib modules, in file and source order."""
    docs: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
                    if max_documents is not None and len(docs) >= max_documents:
                        return docs
    return docs
