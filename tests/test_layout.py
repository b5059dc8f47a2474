"""The shape of the code: modules import in one direction, and only the upload
table decides what phase an upload is in."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from .harness import ROOT

PACKAGE = ROOT / "incoming"


def imports(path: Path) -> set[str]:
    """The `incoming` modules a module imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("incoming."):
            found.add(node.module.split(".")[1])  # type: ignore[union-attr]
    return found


def test_the_import_graph_has_no_cycles() -> None:
    graph = {path.stem: imports(path) for path in PACKAGE.glob("*.py")}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        assert module not in visiting, " -> ".join([*visiting, module])
        if module in done or module not in graph:
            return
        visiting.append(module)
        for imported in graph[module]:
            visit(imported)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_only_the_upload_table_sets_or_compares_phases() -> None:
    deciding = re.compile(r"\.phase\s*(is|==|!=|=(?!=))|Phase\.[A-Z_]+")
    for path in PACKAGE.glob("*.py"):
        if path.stem == "upload":
            continue
        lines = [line for line in path.read_text().splitlines() if deciding.search(line)]
        assert lines == [], (path.name, lines)
