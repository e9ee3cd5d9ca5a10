"""The launcher's import graph: a DAG, a light side that stays light, and no light module reaching the workers.

Every module in launcher/ is parsed with `ast`; imports of launcher modules are
collected wherever they are written (module level or inside a function).
Imports under `if TYPE_CHECKING:` are left out: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LAUNCHER = Path(__file__).resolve().parents[2] / "launcher"
HEAVY = {
    "torch", "deepspeed", "accelerate", "transformers", "matplotlib", "tokenizers", "numpy", "datasets", "peft",
    "safetensors",
}  # fmt: skip
# The path rule: launcher/worker/ is the worker process; every other module is the light side.
WORKER_PACKAGE = "worker"


def _is_worker(module: str) -> bool:
    return module.split(".")[0] == WORKER_PACKAGE


def _name(path: Path) -> str:
    parts = path.relative_to(LAUNCHER).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(LAUNCHER.rglob("*.py")) if _name(p)}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import that runs, absolute names."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other, top)
                continue
            inner = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".") if package else []
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(["launcher", *anchor, *([base] if base else [])])
                found.append((base, top))
                # `from launcher import plan` imports the module launcher.plan.resolve
                found.extend((f"{base}.{alias.name}", top) for alias in child.names)
            visit(child, inner)

    visit(tree, True)
    return found


def _launcher_edges(module: str) -> set[str]:
    edges = set()
    for name, _ in _imports(module):
        if name.startswith("launcher.") and name.removeprefix("launcher.") in MODULES:
            target = name.removeprefix("launcher.")
            if target != module:
                edges.add(target)
    return edges


GRAPH = {m: _launcher_edges(m) for m in MODULES}


def _cycles() -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            walk(node)
    return cycles


def test_launcher_imports_form_a_dag() -> None:
    assert _cycles() == [], " ; ".join(" -> ".join(c) for c in _cycles())


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not _is_worker(m)))
def test_light_module_imports_nothing_heavy_at_module_level(module: str) -> None:
    heavy = sorted({n for n, top in _imports(module) if top and n.split(".")[0] in HEAVY})
    assert heavy == [], f"launcher.{module} imports {heavy} at module level"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not _is_worker(m)))
def test_light_module_never_imports_a_worker_module(module: str) -> None:
    workers = sorted(t for t in GRAPH[module] if _is_worker(t))
    assert workers == [], f"launcher.{module} imports {workers}"


def test_the_graph_is_what_the_files_say() -> None:
    # The parser must see both kinds of import, or the tests above prove nothing.
    assert "recipe.schema" in GRAPH["plan.resolve"]
    assert "worker.backends" in GRAPH["worker.train"]
    assert "launcher.recipe.schema" in {n for n, top in _imports("cli") if top}
