"""tokenmill's packages form one-way layers (issue 19; contracts in pyproject.toml).

`lint-imports` checks the contracts in [tool.importlinter]: the layers from server down to
errors, and no import cycle between sibling packages or modules. The second test reads the
import graph itself and fails on any cycle between tokenmill's top-level packages and modules,
so a cycle is caught even when a package is missing from the contracts. Both count imports
inside functions and under `if TYPE_CHECKING:` like any other.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "tokenmill"

# `python -c` rather than the lint-imports script: the venv's bin/ need not be on PATH
_LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def test_import_contracts_are_kept():
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}  # plain, unwrapped report lines
    result = subprocess.run(
        [sys.executable, "-c", _LINT_IMPORTS, "--no-cache", "--no-logo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _top(module: str) -> str:
    """tokenmill.engine.core -> tokenmill.engine; tokenmill itself stays tokenmill."""
    return ".".join(module.split(".")[:2])


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(edges.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def test_no_cycle_between_top_level_packages():
    graph = grimp.build_graph(PACKAGE, cache_dir=None)
    edges: dict[str, set[str]] = defaultdict(set)
    examples: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            source, target = _top(module), _top(imported)
            if source == target:
                continue
            edges[source].add(target)
            for detail in graph.get_import_details(importer=module, imported=imported):
                examples[source, target].append(f"{module}:{detail['line_number']} -> {imported}")

    cycles = _cycles(edges)
    report = []
    for component in cycles:  # each import between the packages of a cycle, one line a pair
        report.append("cycle between " + ", ".join(component) + ":")
        for source in component:
            for target in sorted(edges[source] & set(component)):
                first, *more = examples[source, target]
                report.append(
                    f"    {source} -> {target}: {first}" + (f" (+{len(more)})" * bool(more))
                )
    assert not cycles, "\n".join(report)
