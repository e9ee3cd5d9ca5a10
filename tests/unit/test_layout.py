"""The path rule, checked on the source: where a module lives says what it may import.

- Outside launcher/worker/ (the light side: `check`, `--dry-run`, the launcher, `report`), a module
  imports at module level only the standard library, the allowlist below and light launcher modules;
  it never imports a worker module, not even inside a function or for type checking.
- launcher/worker/ is the only place torch (or another heavy library) is imported at module level.
- The launcher's imports form no cycle, `TYPE_CHECKING` imports counted.
- Everything outside worker/ is held to strict typing (pyproject.toml's mypy override list).
- Modules stay under 400 lines and functions under 60.
- bench/ scripts import only launcher modules and names that exist, so a move cannot break them silently.

Every file is parsed with `ast`; nothing here imports a launcher module.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "launcher"
BENCH = ROOT / "bench"
# What a light module may import at module level besides the standard library and light launcher modules.
LIGHT_ALLOWED = frozenset({"pydantic", "yaml", "jinja2", "rich"})
HEAVY = frozenset({
    "torch", "deepspeed", "accelerate", "transformers", "matplotlib", "tokenizers", "numpy", "datasets", "peft",
    "safetensors",
})  # fmt: skip
WORKER = "worker"  # launcher/worker/: the worker process
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Import:
    name: str  # absolute: "launcher.plan.resolve", "torch.nn"
    top: bool  # runs when the module is imported (not inside a function)
    typing_only: bool  # under `if TYPE_CHECKING:`


def _name(path: Path) -> str:
    parts = path.relative_to(LAUNCHER).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(LAUNCHER.rglob("*.py")) if _name(p)}


def _is_worker(module: str) -> bool:
    return module.split(".")[0] == WORKER


LIGHT = sorted(m for m in MODULES if not _is_worker(m))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, package: str = "") -> list[Import]:
    """Every import statement in `source`, absolute (`package`: the module's package under launcher/)."""
    found: list[Import] = []

    def visit(node: ast.AST, top: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for inner in child.body:
                    visit_one(inner, top, True)
                for inner in child.orelse:
                    visit_one(inner, top, typing_only)
                continue
            visit_one(child, top, typing_only)

    def visit_one(child: ast.AST, top: bool, typing_only: bool) -> None:
        if isinstance(child, ast.Import):
            found.extend(Import(alias.name, top, typing_only) for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                anchor = package.split(".") if package else []
                anchor = anchor[: len(anchor) - (child.level - 1)]
                base = ".".join(["launcher", *anchor, *([base] if base else [])])
            found.append(Import(base, top, typing_only))
            # `from launcher.plan import resolve` imports the module launcher.plan.resolve
            found.extend(Import(f"{base}.{alias.name}", top, typing_only) for alias in child.names)
        inner = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        visit(child, inner, typing_only)

    visit(ast.parse(source), True, False)
    return found


def _imports(module: str) -> list[Import]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return imports_of(path.read_text(), package)


def _launcher_module(name: str) -> str | None:
    """The launcher module an import names ("launcher.plan.resolve" -> "plan.resolve"), if any."""
    inner = name.removeprefix("launcher.")
    return inner if name.startswith("launcher.") and inner in MODULES else None


def _edges(module: str, typing_too: bool) -> set[str]:
    targets = {_launcher_module(i.name) for i in _imports(module) if typing_too or not i.typing_only}
    return {t for t in targets if t is not None and t != module}


def _allowed_light(name: str) -> bool:
    root = name.split(".")[0]
    if root == "launcher":
        inner = name.removeprefix("launcher.")
        return name == "launcher" or not _is_worker(inner)
    return root in sys.stdlib_module_names or root in LIGHT_ALLOWED


# --------------------------------------------------------------------------- what a module imports


@pytest.mark.parametrize("module", LIGHT)
def test_a_light_module_imports_only_the_allowlist_at_module_level(module: str) -> None:
    stray = sorted(
        {i.name for i in _imports(module) if i.top and not i.typing_only and not _allowed_light(i.name)}
    )
    assert stray == [], (
        f"launcher/{module}: imports {stray} at module level; outside launcher/worker/ only the standard "
        f"library, {sorted(LIGHT_ALLOWED)} and light launcher modules may be (import the rest inside a function)"
    )


@pytest.mark.parametrize("module", LIGHT)
def test_a_light_module_never_imports_a_worker_module(module: str) -> None:
    workers = sorted(i.name for i in _imports(module) if (m := _launcher_module(i.name)) and _is_worker(m))
    assert workers == [], f"launcher/{module} imports {workers} (inside a function or for types counts too)"


def test_only_the_worker_imports_heavy_libraries_at_module_level() -> None:
    at_top = {
        module: sorted(
            {
                i.name
                for i in _imports(module)
                if i.top and not i.typing_only and i.name.split(".")[0] in HEAVY
            }
        )
        for module in MODULES
    }
    assert {m: names for m, names in at_top.items() if names and not _is_worker(m)} == {}
    assert any("torch" in at_top[m] for m in MODULES if _is_worker(m)), (
        "the parser sees no torch import at all"
    )


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    return cycles


def test_no_import_cycle_type_checking_imports_included() -> None:
    cycles = _cycles({m: _edges(m, typing_too=True) for m in MODULES})
    assert cycles == [], "import cycles: " + " ; ".join(" -> ".join(c) for c in cycles)


# The rooms in the order they may import each other: each only those before it (README.md, "How the
# code is laid out"). errors, cli and __main__ stand outside: errors imports nothing, cli everything.
PACKAGE_ORDER = ("recipe", "rundir", "plan", "run", "analysis", "worker")


def _room(module: str) -> str:
    return module.split(".")[0]


def test_every_room_imports_only_the_rooms_before_it() -> None:
    assert {_room(m) for m in MODULES} == {*PACKAGE_ORDER, "errors", "cli", "__main__"}
    upward = sorted(
        f"{m} -> {t}"
        for m in MODULES
        if _room(m) in PACKAGE_ORDER
        for t in _edges(m, typing_too=True)
        if _room(t) in PACKAGE_ORDER and PACKAGE_ORDER.index(_room(t)) > PACKAGE_ORDER.index(_room(m))
    )
    assert upward == [], "imports against the order " + " < ".join(PACKAGE_ORDER) + ": " + ", ".join(upward)
    assert _edges("errors", typing_too=True) == set()
    assert not any("cli" in _edges(m, typing_too=True) for m in MODULES if m != "__main__"), (
        "nothing imports cli"
    )


def test_the_parser_sees_every_kind_of_import() -> None:
    # Or the tests above prove nothing.
    found = imports_of(
        "from typing import TYPE_CHECKING\nimport os\nif TYPE_CHECKING:\n    from launcher.plan import resolve\n"
        "def f():\n    import torch\nfrom . import sibling\n",
        "plan",
    )
    assert Import("os", True, False) in found
    assert Import("launcher.plan.resolve", True, True) in found
    assert Import("torch", False, False) in found
    assert Import("launcher.plan.sibling", True, False) in found
    assert "recipe.schema" in _edges("plan.resolve", typing_too=False)
    assert "worker.backends" in _edges("worker.train", typing_too=False)
    assert not _allowed_light("torch")
    assert not _allowed_light("launcher.worker.train")
    assert _allowed_light("launcher.plan.resolve")
    assert _allowed_light("json")
    assert _cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]


# --------------------------------------------------------------------------- strict typing


def test_strict_typing_covers_everything_outside_the_worker() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    strict = [o for o in config["tool"]["mypy"]["overrides"] if o.get("disallow_untyped_defs")]
    assert len(strict) == 1, "one override holds the strict settings"
    listed = strict[0]["module"]
    listed = sorted([listed] if isinstance(listed, str) else listed)
    expected = {"launcher"}  # the package's own __init__
    for path in sorted(LAUNCHER.iterdir()):
        if path.name == WORKER or path.name.startswith((".", "__pycache__")):
            continue
        if path.is_dir() and (path / "__init__.py").exists():
            expected.add(f"launcher.{path.name}.*")
        elif path.suffix == ".py" and path.name != "__init__.py":
            expected.add(f"launcher.{path.stem}")
    assert listed == sorted(expected)


# --------------------------------------------------------------------------- sizes


def _long_functions(source: str) -> list[tuple[str, int]]:
    return [
        (node.name, node.end_lineno - node.lineno + 1)  # type: ignore[operator]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES  # type: ignore[operator]
    ]


def test_no_module_is_over_400_lines() -> None:
    sizes = {f"launcher/{p.relative_to(LAUNCHER)}": len(p.read_text().splitlines()) for p in MODULES.values()}
    assert {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_no_function_is_over_60_lines() -> None:
    long = [
        f"launcher/{path.relative_to(LAUNCHER)}: {name} ({n} lines)"
        for path in MODULES.values()
        for name, n in _long_functions(path.read_text())
    ]
    assert long == []


def test_the_size_check_counts_a_long_function() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert _long_functions(f"def f():\n{body}\n") == [("f", MAX_FUNCTION_LINES + 1)]
    assert _long_functions("def g():\n    return 1\n") == []


# --------------------------------------------------------------------------- bench/


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements a module runs on import: its body, with the bodies of `if` and `try` opened."""
    out: list[ast.stmt] = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If | ast.Try):
            inner = [*node.body, *node.orelse, *getattr(node, "finalbody", [])]
            inner += [s for h in getattr(node, "handlers", []) for s in h.body]
            out += _top_level(inner)
    return out


def _defines(module: str, name: str) -> bool:
    """`name` is a submodule of launcher `module` or a name bound at its top level."""
    if f"{module}.{name}" in MODULES:
        return True
    for node in _top_level(ast.parse(MODULES[module].read_text()).body):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound = {node.name}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            bound = {a.asname or a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            bound = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        else:
            continue
        if name in bound:
            return True
    return False


def missing_launcher_names(source: str) -> list[str]:
    """The launcher modules and names `source` imports that do not exist."""
    missing = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            missing += [
                a.name for a in node.names if a.name.startswith("launcher.") and not _launcher_module(a.name)
            ]
        elif (
            isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("launcher")
        ):
            base = node.module or ""
            module = "" if base == "launcher" else _launcher_module(base)
            if module is None:
                missing.append(base)
                continue
            for alias in node.names:
                found = f"{module}.{alias.name}".lstrip(".") in MODULES or (
                    module and _defines(module, alias.name)
                )
                if not found:
                    missing.append(f"{base}.{alias.name}")
    return missing


@pytest.mark.parametrize("script", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_bench_scripts_import_only_launcher_names_that_exist(script: Path) -> None:
    assert missing_launcher_names(script.read_text()) == []


def test_the_bench_check_finds_a_moved_module_and_a_missing_name() -> None:
    code = "from launcher.plan import hf_dir\nfrom launcher.gone import x\nimport launcher.nowhere\n"
    code += "from launcher.plan.resolve import resolve, no_such_name\nfrom launcher import plan, gone\n"
    assert missing_launcher_names(code) == [
        "launcher.gone",
        "launcher.nowhere",
        "launcher.plan.resolve.no_such_name",
        "launcher.gone",
    ]


# --------------------------------------------------------------------------- the test tiers

TESTS = ROOT / "tests"
# What brings torch into a process (tokenizers, numpy and safetensors.numpy do not).
TORCH_BOUND = frozenset({"torch", "deepspeed", "accelerate", "transformers", "peft"})


def _torch_bound(name: str) -> bool:
    parts = name.split(".")
    return parts[0] in TORCH_BOUND or "torch" in parts or name.startswith("launcher.worker")


def test_unit_tests_never_import_a_heavy_library_or_a_worker_module() -> None:
    """tests/unit stays torch-free (tests/unit/conftest.py also fails a test that brings torch in)."""
    found = {
        f"tests/unit/{path.name}": sorted(
            {i.name for i in imports_of(path.read_text()) if _torch_bound(i.name)}
        )
        for path in sorted((TESTS / "unit").glob("*.py"))
    }
    assert {path: names for path, names in found.items() if names} == {}


def test_no_test_file_imports_another_test_file() -> None:
    """Helpers that tests share live in modules at tests/ (runs.py, user_code.py, ...), not in test files."""
    found = {
        str(path.relative_to(ROOT)): sorted(
            {i.name for i in imports_of(path.read_text()) if i.name.split(".")[-1].startswith("test_")}
        )
        for path in sorted(TESTS.rglob("*.py"))
    }
    assert {path: names for path, names in found.items() if names} == {}
