"""The layout rules of the code, read from its syntax trees (`ast`), so that they cannot quietly regress:

- no module reads or writes another object's private members (`x._name` where `x` is not `self`/`cls`/
  `super()`; dunders and the public API of named tuples and rows, `_asdict`/`_replace`/..., are not private);
- no import circle inside `daemon/research/`, `daemon/store/`, `daemon/agents/` or `daemon/cli/`: the graph counts every import, also those under
  `if TYPE_CHECKING:` and inside functions (`from pkg import sub` is an edge to the module `pkg.sub`; that
  importing a submodule first runs its package's `__init__` is not counted, or every package would be a circle);
- no class in `daemon/research/` or `daemon/store/` over 300 lines.
Each checker is also run on a small planted package, to show that it finds what it looks for.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESEARCH = ROOT / "daemon" / "research"
NOT_PRIVATE = {"_asdict", "_replace", "_fields", "_field_defaults", "_make", "_mapping", "_tuple"}
STORE = ROOT / "daemon" / "store"
MAX_CLASS_LINES = 300


def modules(package: Path) -> Iterator[Path]:
    yield from sorted(path for path in package.rglob("*.py") if "__pycache__" not in path.parts)


def private_reads(path: Path) -> list[str]:
    """`line: expression` of each access to another object's private member in one module."""
    found: list[tuple[int, int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
            continue
        if (node.attr.startswith("__") and node.attr.endswith("__")) or node.attr in NOT_PRIVATE:
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
            continue
        found.append((node.lineno, node.col_offset, ast.unparse(node)))
    return [f"{line}: {text}" for line, _col, text in sorted(found)]


def module_names(root: Path, package: Path) -> dict[str, Path]:
    """Dotted name of each module of `package` (a folder under `root`); a package's name is its `__init__`'s."""
    names = {}
    for path in modules(package):
        parts = path.relative_to(root).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph(root: Path, package: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (anywhere in its body, type-only ones too)."""
    names = module_names(root, package)
    graph: dict[str, set[str]] = {name: set() for name in names}
    for name, path in names.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join([*here[:len(here) - node.level + 1], *([node.module] if node.module else [])]) \
                    if node.level else (node.module or "")
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else base for alias in node.names]
            for target in targets:
                while target and target not in names:  # `import a.b.c` of a package's module, or a name in it
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (its modules, the first repeated at the end), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        if name in path:
            return [*path[path.index(name):], name]
        if name in done:
            return None
        path.append(name)
        for target in sorted(graph[name]):
            cycle = visit(target)
            if cycle is not None:
                return cycle
        path.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = visit(name)
        if cycle is not None:
            return cycle
    return None


def long_classes(path: Path, limit: int) -> list[str]:
    return [f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None
            and node.end_lineno - node.lineno + 1 > limit]


def plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


# -- the code base --------------------------------------------------------------------------------------


def test_research_modules_read_no_private_members_of_other_objects() -> None:
    """No module of daemon/research reads or writes another object's `_private` member."""
    found = {str(path.relative_to(ROOT)): reads for path in modules(RESEARCH) if (reads := private_reads(path))}
    assert found == {}


def test_daemon_modules_read_no_private_members_of_other_objects() -> None:
    """No module of daemon/ reads or writes another object's `_private` member."""
    found = {str(path.relative_to(ROOT)): reads for path in modules(ROOT / "daemon") if (reads := private_reads(path))}
    assert found == {}


def test_research_package_has_no_import_cycle() -> None:
    """The imports among daemon/research's modules (type-only and function-level ones too) form no circle."""
    cycle = find_cycle(import_graph(ROOT, RESEARCH))
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_store_agents_and_cli_packages_have_no_import_cycle() -> None:
    """The imports among the modules of daemon/store, daemon/agents and daemon/cli form no circle."""
    for package in (STORE, ROOT / "daemon" / "agents", ROOT / "daemon" / "cli"):
        cycle = find_cycle(import_graph(ROOT, package))
        assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_research_and_store_classes_stay_under_300_lines() -> None:
    """No class of daemon/research or daemon/store grows past 300 lines."""
    found = {path.name: classes for package in (RESEARCH, STORE) for path in modules(package)
             if (classes := long_classes(path, MAX_CLASS_LINES))}
    assert found == {}


# -- the checkers themselves ----------------------------------------------------------------------------


def test_private_member_checker_finds_a_planted_read(tmp_path: Path) -> None:
    """A read of another object's private member (and a write) is found, with its line."""
    module = plant(tmp_path, {"part.py": "def f(session):\n    session._lock.acquire()\n    session._fatal = 'x'\n"})
    assert private_reads(module / "part.py") == ["2: session._lock", "3: session._fatal"]


def test_private_member_checker_allows_own_members_dunders_and_row_api(tmp_path: Path) -> None:
    """self._x, cls._x, super()._x, dunders and `row._asdict()` are not counted as private reads."""
    module = plant(tmp_path, {"part.py": (
        "class A(B):\n"
        "    def f(self, row):\n"
        "        return self._a, super()._spec(), type(self).__name__, row._asdict()\n"
        "    @classmethod\n"
        "    def g(cls):\n"
        "        return cls._b\n")})
    assert private_reads(module / "part.py") == []


def test_cycle_checker_finds_a_type_only_circle(tmp_path: Path) -> None:
    """A circle closed by an import under `if TYPE_CHECKING:` is found and printed in order."""
    package = plant(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/driver.py": "from pkg.part import Part\n",
        "pkg/part.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.driver import Driver\n",
    }) / "pkg"
    assert find_cycle(import_graph(tmp_path, package)) == ["pkg.driver", "pkg.part", "pkg.driver"]


def test_cycle_checker_follows_relative_and_function_level_imports(tmp_path: Path) -> None:
    """`from . import sub` inside a function is an edge to the submodule: its circle is found."""
    package = plant(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import pkg.b\n",
        "pkg/b.py": "def late():\n    from . import a\n    return a\n",
    }) / "pkg"
    assert find_cycle(import_graph(tmp_path, package)) == ["pkg.a", "pkg.b", "pkg.a"]


def test_cycle_checker_passes_a_layered_package(tmp_path: Path) -> None:
    """A package whose modules import only downwards (and from the package's submodules) has no circle."""
    package = plant(tmp_path, {
        "pkg/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.top import Top\n",
        "pkg/top.py": "from pkg import low\nfrom pkg.mid import Mid\n",
        "pkg/mid.py": "from .low import Low\n",
        "pkg/low.py": "import os\n",
    }) / "pkg"
    graph = import_graph(tmp_path, package)
    assert graph["pkg.top"] == {"pkg.low", "pkg.mid"} and find_cycle(graph) is None


def test_class_length_checker_finds_a_planted_long_class(tmp_path: Path) -> None:
    """A class longer than the limit is named with its length."""
    module = plant(tmp_path, {"big.py": "class Big:\n" + "    x = 1\n" * 5})
    assert long_classes(module / "big.py", 5) == ["Big: 6 lines"]
