"""The package's shape, read from its source: no import cycles, SQL only in the store."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import bootserver

PACKAGE = Path(bootserver.__file__).resolve().parent
SQL_DRIVERS = ("sqlite3", "psycopg")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """Imports under `if TYPE_CHECKING:` run only in a type checker, never at run time: no cycle."""
    skipped: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {n for child in node.body for n in ast.walk(child)}
    return skipped


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every bootserver module `name` imports, at the top or inside a function (both run, sooner or later)."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_only(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from . import x`: the module x
    # A module's own parent packages are loaded before it whatever it imports: an edge to them says nothing.
    parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {m for m in found if m in known and m != name and m not in parents}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of two or more modules (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_follows_relative_and_function_local_imports(tmp_path):
    known = {"bootserver.x": Path(), "bootserver.y": Path(), "bootserver.p": Path(), "bootserver.p.z": Path()}
    source = tmp_path / "x.py"
    source.write_text("from . import y\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .p import z\n"
                      "def f():\n    from .p.z import thing\n")
    assert imports("bootserver.x", source, known) == {"bootserver.y", "bootserver.p.z"}


def test_only_the_store_speaks_sql():
    offenders = {name for name, path in modules().items() if not name.startswith("bootserver.store")
                 and any(driver in imports_any(path) for driver in SQL_DRIVERS)}
    assert offenders == set()


def imports_any(path: Path) -> set[str]:
    """Top-level package names `path` imports (any package, not only ours)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_nobody_reaches_into_the_core():
    """Protocols, pages, the provisioner and the CLI call the core's methods: its store, config, keys and templates
    are its own (Booter.history() and Booter.web_settings() are what the others read)."""
    reach = re.compile(r"(?:\bbooter|\[BOOTER\])\._?(?:store|config|keys|templates)\b")
    found = [f"{name}: {line.strip()}" for name, path in modules().items() if name != "bootserver.booter"
             for line in path.read_text().splitlines() if reach.search(line)]
    assert not found, "reached into the core:\n" + "\n".join(found)


TESTS = Path(__file__).resolve().parent


def test_no_test_module_imports_another_test_module_or_conftest():
    """Shared helpers live in tests/support/: a test module imported by another runs its tests twice, and
    conftest is pytest's to load."""
    offenders = sorted(f"{path.relative_to(TESTS)} imports {name}" for path in TESTS.rglob("*.py")
                       for name in imports_any(path) if name == "conftest" or name.startswith("test_"))
    assert offenders == []


def test_tests_hold_only_test_modules_and_conftest_at_the_top():
    helpers = sorted(p.name for p in TESTS.glob("*.py") if p.name != "conftest.py" and not p.name.startswith("test_"))
    assert helpers == [], "shared helpers belong in tests/support/"
