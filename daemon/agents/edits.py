"""Applying an agent's search/replace edits to train.py and checking the result before it costs GPU time.

The guard rules catch honest mistakes and obvious cheating early, with a message the model can act on.
They are not the security boundary: the sandbox is (no network, train split only, the harness measures
time and evaluates the checkpoint itself). The rules, and why each exists:

- size: a runaway rewrite must not fill the database or the prompt.
- parse + compile: a syntax error would only waste a sandbox start.
- no process, network, native-code or code-loading modules (`subprocess`, `socket`, `ctypes`, `pickle`...),
  no `exec`/`eval`/`__import__`, no `os.system`/`fork`/`kill`: a training script needs none of them.
- `trainer.prepare` only through its public names, never its evaluation entry point, and nothing of
  `trainer.harness`: the trusted evaluation is not the candidate's business.
- never name the validation split (a `val` path component) or the eval-only environment variable.
- keep reading the time budget from `AUTORESEARCH_TIME_BUDGET` and never write the environment.
- keep the checkpoint save call, else the eval stage has nothing to measure.
- not a duplicate: the normalized source (comments and formatting dropped) was not tried this session.
"""

from __future__ import annotations

import ast
import hashlib
import re
from collections.abc import Iterable

from daemon import syntax
from daemon.agents.types import Edit
from daemon.errors import InvalidProposal

MAX_SOURCE_BYTES = 256 * 1024
TIME_BUDGET_ENV = "AUTORESEARCH_TIME_BUDGET"
CHECKPOINT_CALL = "export_checkpoint"  # trainer.prepare's exporter, as the baseline calls it
FORBIDDEN_MODULES = frozenset({
    "subprocess", "pty", "multiprocessing", "signal",  # processes
    "socket", "ssl", "http", "urllib", "requests", "ftplib", "smtplib", "telnetlib", "xmlrpc",  # network
    "ctypes", "cffi",  # native code
    "importlib", "pickle", "marshal", "shelve", "runpy", "code", "codeop",  # code loading
})
FORBIDDEN_BUILTINS = frozenset({"exec", "eval", "compile", "__import__", "breakpoint"})
FORBIDDEN_OS_CALLS = frozenset({
    "system", "popen", "fork", "forkpty", "kill", "killpg", "setsid", "putenv", "unsetenv",
    "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
    "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
    "posix_spawn", "posix_spawnp",
})
TRUSTED_ONLY_MODULES = frozenset({"trainer.harness", "trainer.eval_stage"})
PREPARE_MODULE = "trainer.prepare"
PREPARE_EVAL_NAMES = frozenset({"evaluate_bpb"})
EVAL_ONLY_ENV = "AUTORESEARCH_EVAL_TOKENS"
_ENVIRON_MUTATORS = frozenset({"update", "setdefault", "pop", "popitem", "clear"})
_VAL_PATH = re.compile(r"(^|[/\\])val([/\\]|$)")


def apply_edits(source: str, edits: Iterable[Edit]) -> str:
    """Apply the edits in order; each search text must occur exactly once in the file as it stands then."""
    edits = tuple(edits)
    if not edits:
        raise InvalidProposal("the proposal has no edits: give at least one search/replace block")
    if any(edit.search == "" for edit in edits):
        if len(edits) > 1:
            raise InvalidProposal("a whole-file replacement must be the only edit: send either the whole file or search/replace blocks")
        result = edits[0].replace
    else:
        result = source
        for number, edit in enumerate(edits, start=1):
            count = result.count(edit.search)
            if count == 0:
                raise InvalidProposal(
                    f"edit {number}: the search text does not occur in train.py "
                    f"({_not_found_hint(result, edit.search)}); copy it exactly from the current file, "
                    f"whitespace included, after the earlier edits of this proposal"
                )
            if count > 1:
                raise InvalidProposal(
                    f"edit {number}: the search text occurs {count} times in train.py; "
                    f"include enough surrounding lines to make it unique"
                )
            result = result.replace(edit.search, edit.replace, 1)
    if result == source:
        raise InvalidProposal("the edits leave train.py unchanged: propose an actual change")
    return result


def _not_found_hint(text: str, search: str) -> str:
    def squash(value: str) -> str:
        return re.sub(r"\s+", " ", value).strip()

    if squash(search) and squash(search) in squash(text):
        return "it matches only when whitespace is ignored: check indentation and line breaks"
    first_line = search.strip().splitlines()[0] if search.strip() else ""
    return f"first line {first_line[:120]!r}"


def normalized_hash(source: str) -> str:
    """SHA-256 of the source with comments and formatting dropped (`ast.unparse` of its tree)."""
    return _tree_hash(syntax.parse(source))


def _tree_hash(tree: ast.AST) -> str:
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()


def validate_candidate(source: str, seen_hashes: Iterable[str]) -> str:
    """Check a candidate train.py; return its normalized hash or raise `InvalidProposal` saying what to fix."""
    size = len(source.encode())
    if size > MAX_SOURCE_BYTES:
        raise InvalidProposal(f"train.py would be {size} bytes, over the limit of {MAX_SOURCE_BYTES}: make it smaller")
    try:
        tree = syntax.parse(source, filename="train.py")
        syntax.compile_tree(tree, "train.py")
    except SyntaxError as exc:
        raise InvalidProposal(f"train.py does not compile: line {exc.lineno}: {exc.msg}") from None
    except ValueError as exc:  # e.g. null bytes in the source
        raise InvalidProposal(f"train.py does not compile: {exc}") from None
    for problem in _guard_problems(tree):
        raise InvalidProposal(problem)
    digest = _tree_hash(tree)
    if digest in set(seen_hashes):
        raise InvalidProposal(
            "this candidate is identical (ignoring comments and formatting) to one already tried tonight: "
            "propose a different change"
        )
    return digest


def _guard_problems(tree: ast.Module) -> Iterable[str]:
    reads_time_budget = False
    saves_checkpoint = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _import_problems(alias.name, ())
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            yield from _import_problems(module, tuple(alias.name for alias in node.names))
        elif isinstance(node, ast.Call):
            name = _called_name(node.func)
            if isinstance(node.func, ast.Name) and name in FORBIDDEN_BUILTINS:
                yield f"line {node.lineno}: calling {name}() is not allowed in train.py: write the code directly"
            if _is_os_attribute(node.func, FORBIDDEN_OS_CALLS):
                yield f"line {node.lineno}: os.{name}() is not allowed in train.py: a training script needs no processes, signals or environment changes"
            if name in _ENVIRON_MUTATORS and isinstance(node.func, ast.Attribute) and _mentions_os_environ(node.func.value):
                yield f"line {node.lineno}: train.py must not change the environment: leave os.environ as it is"
            if name == CHECKPOINT_CALL:
                saves_checkpoint = True
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value == TIME_BUDGET_ENV:
                reads_time_budget = True
            if EVAL_ONLY_ENV in node.value:
                yield f"line {node.lineno}: {EVAL_ONLY_ENV} belongs to the trusted eval stage: do not use it"
            if _VAL_PATH.search(node.value):
                yield (f"line {node.lineno}: the string {node.value[:80]!r} names the validation split; "
                       "train.py may only use the train split")
        elif isinstance(node, ast.Subscript | ast.Attribute) and isinstance(node.ctx, ast.Store | ast.Del):
            target = node.value if isinstance(node, ast.Subscript) else node
            if _mentions_os_environ(target) or _is_prepare_attribute(node):
                yield f"line {node.lineno}: train.py must not change the environment or trainer.prepare: leave them as they are"
    if not reads_time_budget:
        yield (f"train.py no longer reads its time budget from {TIME_BUDGET_ENV}: keep the baseline's "
               "time-budget code unchanged")
    if not saves_checkpoint:
        yield f"train.py no longer calls {CHECKPOINT_CALL}(): keep the checkpoint save, the eval stage needs it"


def _import_problems(module: str, names: tuple[str, ...]) -> Iterable[str]:
    top = module.split(".")[0]
    if module.startswith("."):
        yield f"relative import {module!r}: train.py is a single file, import absolute modules only"
    elif top in FORBIDDEN_MODULES:
        yield f"importing {module!r} is not allowed in train.py (no processes, network, native code or code loading)"
    elif any(module == trusted or module.startswith(trusted + ".") for trusted in TRUSTED_ONLY_MODULES) or (
        module == "trainer" and {"harness", "eval_stage"} & set(names)
    ):
        yield "train.py must not import trainer.harness or trainer.eval_stage: the trusted evaluation is not the candidate's business"
    elif module == PREPARE_MODULE:
        for name in names:
            if name.startswith("_") or name == "*":
                yield f"importing {name!r} from trainer.prepare is not allowed: use its public names only"
            elif name in PREPARE_EVAL_NAMES:
                yield f"importing {name!r} is not allowed: evaluation is done by the trusted harness, not train.py"


def _called_name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _is_os_attribute(func: ast.expr, names: frozenset[str]) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr in names
            and isinstance(func.value, ast.Name) and func.value.id == "os")


def _mentions_os_environ(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ"
    )


def _is_prepare_attribute(node: ast.expr) -> bool:
    # `prepare.X = ...` or `trainer.prepare.X = ...`: monkeypatching the fixed module.
    if not isinstance(node, ast.Attribute):
        return False
    owner = node.value
    return (isinstance(owner, ast.Name) and owner.id == "prepare") or (
        isinstance(owner, ast.Attribute) and owner.attr == "prepare"
    )
