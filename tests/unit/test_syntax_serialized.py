"""Every AST conversion in the daemon goes through `daemon.syntax` (CPython 3.11, gh-106905: two threads converting
trees at once fail with "AST constructor recursion depth mismatch")."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

from daemon import syntax

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("daemon", "sandbox")
# compile() of a *string* never builds Python AST objects, so it does not take the lock; each one is named here.
STRING_COMPILES = {("daemon/research/workspace.py", "baseline_source")}


def _calls(path: Path) -> list[tuple[str, str]]:
    """(call, enclosing function) of every ast.parse / compile call in one module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                func = child.func
                if isinstance(func, ast.Attribute) and func.attr == "parse" and \
                        isinstance(func.value, ast.Name) and func.value.id == "ast":
                    found.append(("ast.parse", function))
                elif isinstance(func, ast.Name) and func.id == "compile":
                    found.append(("compile", function))
            visit(child, name)

    visit(tree, "<module>")
    return found


def _offenders(root: Path) -> list[str]:
    offenders = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel == "daemon/syntax.py":
                continue
            for call, function in _calls(path):
                if call == "compile" and (rel, function) in STRING_COMPILES:
                    continue
                offenders.append(f"{rel}: {call}() in {function} (use daemon.syntax)")
    return offenders


def test_no_module_parses_outside_the_lock() -> None:
    """No daemon or sandbox module calls ast.parse or compile directly (daemon.syntax serializes them)."""
    assert _offenders(ROOT) == []


def test_the_scan_finds_a_planted_parse(tmp_path: Path) -> None:
    """The scan reports a direct ast.parse call, so the check above can fail."""
    (tmp_path / "daemon").mkdir()
    (tmp_path / "sandbox").mkdir()
    (tmp_path / "daemon" / "bad.py").write_text("import ast\n\ndef f(s):\n    return ast.parse(s)\n")
    assert _offenders(tmp_path) == ["daemon/bad.py: ast.parse() in f (use daemon.syntax)"]


def test_parses_from_many_threads_all_succeed() -> None:
    """Deeply nested sources parsed and compiled from eight threads at once all convert (none raises SystemError)."""
    source = (ROOT / "trainer" / "train.py").read_text() + "\nx = " + "(" * 90 + "1" + ")" * 90 + "\n"
    errors: list[BaseException] = []

    def work() -> None:
        for _ in range(10):
            try:
                syntax.compile_tree(syntax.parse(source), "<candidate>")
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
