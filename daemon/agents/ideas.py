"""The idea memory: every change a research line has tried, keyed so that a repeat is recognised before it runs.

A change is read at the level of the code's meaning, not its text (`change_of(parent, candidate)`):
- both sources are normalized (`ast.unparse`, docstrings dropped: formatting and comments do not count);
- the change is the multiset of normalized lines it removes and adds (`key`), so the same change made on
  a different best is the same idea;
- a candidate that equals a tried source up to consistently renamed module-level constants has the same
  `renamed_key` as that source;
- a change that only sets module-level numeric constants records them (`numbers`), so that a value within
  `STEP` (relative) of a value already refused is recognised as the same idea.
`IdeaMemory.match` applies these rules against the ideas of the current measurement version (effects
measured under another eval or clock are not evidence now; `daemon.research.ideas.MEASUREMENT_VERSION`).
Built from the store by `daemon.research.ideas`; shown to the agent by `daemon.agents.ledger_text`.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from daemon import syntax

STEP = 0.10  # a value within 10% of a refused one is the same idea
REFUSED = ("discarded", "did not hold")
MAX_CHANGE_LINES = 40  # normalized lines kept per change (the key covers them all)


@dataclass(frozen=True)
class NumberChange:
    name: str
    old: float
    new: float


@dataclass(frozen=True)
class Change:
    """What a candidate changes against its parent, normalized."""

    key: str
    removed: tuple[str, ...]
    added: tuple[str, ...]
    numbers: tuple[NumberChange, ...]  # set when every changed line sets a numeric module-level constant

    @property
    def empty(self) -> bool:
        return not self.removed and not self.added

    def text(self) -> str:
        lines = [f"-{line}" for line in self.removed] + [f"+{line}" for line in self.added]
        if len(lines) > MAX_CHANGE_LINES:
            lines = [*lines[:MAX_CHANGE_LINES], f"... {len(lines) - MAX_CHANGE_LINES} more lines"]
        return "\n".join(lines)

    @property
    def targets(self) -> tuple[str, ...]:
        """The names the change assigns or defines (module-level constants, functions, classes)."""
        if self.numbers:
            return tuple(sorted({number.name for number in self.numbers}))
        names: set[str] = set()
        for line in (*self.removed, *self.added):
            head = line.strip()
            for prefix in ("def ", "class "):
                if head.startswith(prefix):
                    names.add(head[len(prefix):].split("(")[0].split(":")[0].strip() + "()")
            if " = " in head and head.split(" = ")[0].isidentifier():
                names.add(head.split(" = ")[0])
        return tuple(sorted(names))


@dataclass(frozen=True)
class Idea:
    """One distinct change tried on the line, with what came of it (descriptions and changes are untrusted)."""

    change: Change
    renamed_key: str  # of the candidate source, up to renamed constants
    experiment_ids: tuple[int, ...]  # every experiment that tried it, oldest first
    description: str
    outcome: str  # kept | discarded | crashed | timeout | oom | invalid | did not hold
    effect: float | None  # val_bpb minus the parent's recorded value; negative = better
    se: float | None  # its standard error, from the line's noise
    runs: int
    version: int  # the measurement version it was measured under


@dataclass(frozen=True)
class Match:
    idea: Idea
    why: str


@dataclass(frozen=True)
class IdeaMemory:
    ideas: tuple[Idea, ...]  # oldest first
    version: int  # the current measurement version
    nights: int = 1

    def match(self, parent_source: str, candidate_source: str) -> Match | None:
        """The tried idea that `candidate_source` (built on `parent_source`) repeats, or None."""
        try:
            change = change_of(parent_source, candidate_source)
            renamed = renamed_key(candidate_source)
        except SyntaxError:
            return None  # validation reports it
        current = [idea for idea in self.ideas if idea.version == self.version]
        for idea in current:
            if idea.renamed_key == renamed:
                return Match(idea, "the same program as this tried one, up to formatting, comments and names")
        if change.empty:
            return None
        for idea in current:
            if idea.change.key == change.key:
                return Match(idea, "the same change as this tried one, up to formatting and comments")
        for idea in current:
            if idea.outcome in REFUSED and _one_step_away(change.numbers, idea.change.numbers):
                return Match(idea, f"a value within {STEP:.0%} of one already refused")
        return None


def _one_step_away(proposed: Sequence[NumberChange], refused: Sequence[NumberChange]) -> bool:
    if not proposed or not refused or {n.name for n in proposed} != {n.name for n in refused}:
        return False
    tried = {n.name: n.new for n in refused}
    return all(abs(n.new - tried[n.name]) <= STEP * max(abs(tried[n.name]), 1e-12) for n in proposed)


@lru_cache(maxsize=64)
def normalized_lines(source: str) -> tuple[str, ...]:
    """The source's lines after `ast.unparse`, docstrings dropped (SyntaxError when it does not parse)."""
    tree = syntax.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tuple(ast.unparse(tree).splitlines())


def change_of(parent_source: str, candidate_source: str) -> Change:
    """The normalized change from parent to candidate (SyntaxError when either does not parse)."""
    old, new = normalized_lines(parent_source), normalized_lines(candidate_source)
    removed: list[str] = []
    added: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if tag != "equal":
            removed.extend(old[i1:i2])
            added.extend(new[j1:j2])
    digest = hashlib.sha256("\n".join(["-" + line for line in sorted(removed)] +
                                      ["+" + line for line in sorted(added)]).encode()).hexdigest()
    return Change(digest, tuple(removed), tuple(added), _numbers(removed, added))


def _numbers(removed: Iterable[str], added: Iterable[str]) -> tuple[NumberChange, ...]:
    old = [_constant(line) for line in removed]
    new = [_constant(line) for line in added]
    if not old or None in old or None in new:
        return ()
    before = dict(item for item in old if item is not None)
    after = dict(item for item in new if item is not None)
    if before.keys() != after.keys() or len(before) != len(old) or len(after) != len(new):
        return ()
    return tuple(NumberChange(name, before[name], after[name]) for name in sorted(before))


def _constant(line: str) -> tuple[str, float] | None:
    """(NAME, value) for a line `NAME = <number>` (at module level: no indent), else None."""
    if line.startswith((" ", "\t")):
        return None
    try:
        node = syntax.parse(line).body[0]
    except (SyntaxError, IndexError):
        return None
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
        return None
    try:
        value = ast.literal_eval(node.value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return node.targets[0].id, float(value)


@lru_cache(maxsize=64)
def renamed_key(source: str) -> str:
    """Hash of the normalized source with its module-level UPPER_CASE names renamed in order of definition."""
    tree = syntax.parse("\n".join(normalized_lines(source)))
    names: dict[str, str] = {}
    for statement in tree.body:
        targets: list[ast.expr] = statement.targets if isinstance(statement, ast.Assign) else [
            statement.target] if isinstance(statement, ast.AnnAssign) else []
        for target in targets:
            if isinstance(target, ast.Name) and target.id.isupper() and target.id not in names:
                names[target.id] = f"CONST_{len(names)}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in names:
            node.id = names[node.id]
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()
