"""The import graph of remat's layers, checked: each layer imports only the layers below it.

    python benchmarks/import_graph.py

prints, for each part of the package (a subpackage, or a top-level module), the
other parts it imports, and exits non-zero on an import the layering does not
allow, or on a module longer than MAX_LINES.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "remat"
MAX_LINES = 600

# What each part may import (besides itself). Bottom to top.
ALLOWED: dict[str, set[str]] = {
    "chain": set(),
    "solvers": {"chain"},
    "report": set(),
    "budget": {"report"},
    "plan": {"report"},
    "measure": {"chain"},
    "capture": {"measure"},
    "execute": {"measure"},
    "validate": {"measure"},
    "profile": {"capture", "chain", "execute", "measure", "validate"},
    "planner": {"budget", "capture", "chain", "execute", "measure", "plan", "profile", "solvers", "validate"},
    "api": {"budget", "capture", "execute", "measure", "plan", "planner", "profile", "validate"},
    "__init__": {"api", "budget", "capture", "execute", "measure", "plan"},
    "tools": {"__init__", "api", "budget", "chain", "execute", "measure", "plan", "planner", "report", "solvers"},
}
# The one upward import, deferred to the call: ``remat.max_batch("torchvision:resnet50", ...)``
# accepts a model spec, which the tools' model zoo resolves.
DEFERRED = {("api", "tools")}


def part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """The remat parts ``path`` imports, each with whether the import is deferred (inside a function)."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "remat":
            # ``from remat import optimize`` imports the package's root; ``from remat.x import y``, part x.
            target = node.module.split(".")[1] if "." in node.module else "__init__"
            found.append((target, id(node) not in top))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "remat" and len(parts) > 1:
                    found.append((parts[1], id(node) not in top))
    return found


def main() -> int:
    graph: dict[str, set[str]] = {}
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = part_of(path)
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            problems.append(f"{path.relative_to(PACKAGE.parent)}: {lines} lines (more than {MAX_LINES})")
        for target, deferred in imports_of(path):
            if target == part:
                continue
            graph.setdefault(part, set()).add(target)
            if target not in ALLOWED.get(part, set()) and not (deferred and (part, target) in DEFERRED):
                problems.append(f"{path.relative_to(PACKAGE.parent)} imports remat.{target}: not allowed for {part}")
    for part in ALLOWED:
        print(f"{part:>10} -> {', '.join(sorted(graph.get(part, ()))) or '(nothing)'}")
    for problem in problems:
        print("FAIL:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
