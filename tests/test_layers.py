"""smoe's modules import only downward (docs/ARCHITECTURE.md, "Layers"): the import-linter
`layers` contract in pyproject.toml holds, grimp's graph of every import — function-local ones
counted — has no cycle, and no smoe import hides inside a function (a file's header says what
it depends on)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

from conftest import ROOT


def test_the_layers_contract_holds():
    """pyproject.toml's [tool.importlinter] contract, checked by import-linter itself."""
    lint = Path(sys.executable).parent / "lint-imports"
    run = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 kept, 0 broken" in run.stdout


def test_no_import_cycle_among_smoe_modules():
    """Depth-first search over every smoe module's imports (grimp reads function-local ones too,
    and `smoe/__init__.py` is a module like any other): no module reaches itself."""
    graph = grimp.build_graph("smoe", exclude_type_checking_imports=True)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert len(edges) > 40  # the whole package was read
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in edges.get(module, ()):
            if state.get(imported) == 1:
                cycles.append(path[path.index(imported):] + [imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_no_smoe_import_inside_a_function():
    """Function-local imports are for optional dependencies only (a test extra, a heavy library
    on a rare path), never for smoe's own modules."""
    found = []
    for path in sorted((ROOT / "smoe").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for sub in ast.walk(node):
                names = [sub.module or ""] if isinstance(sub, ast.ImportFrom) else \
                    [a.name for a in sub.names] if isinstance(sub, ast.Import) else []
                if any(n == "smoe" or n.startswith("smoe.") for n in names):
                    found.append(f"{path.relative_to(ROOT)}:{sub.lineno}: {ast.unparse(sub)}")
    assert not found, "\n".join(found)
