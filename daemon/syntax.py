"""`ast.parse` and `compile` of a tree, one thread at a time, for every lane and proposer thread of the daemon.

CPython 3.11 keeps the AST constructor's recursion-depth counter in interpreter-wide state, and converting a
tree can switch threads half-way: two threads parsing at once fail with "SystemError: AST constructor
recursion depth mismatch" (python/cpython gh-106905). The daemon parses candidate sources from several threads
(validation, the idea memory, the offline agent, the judge's simplicity rule), so every such call takes this lock.
"""

from __future__ import annotations

import ast
import threading
from types import CodeType

_LOCK = threading.RLock()


def parse(source: str, filename: str = "<unknown>") -> ast.Module:
    """`ast.parse(source)`, serialized across threads."""
    with _LOCK:
        return ast.parse(source, filename=filename)


def compile_tree(tree: ast.Module, filename: str) -> CodeType:
    """`compile(tree, filename, "exec")`, serialized across threads (it converts the tree back the same way)."""
    with _LOCK:
        return compile(tree, filename, "exec")
