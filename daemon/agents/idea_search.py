"""Searching the idea memory: the ideas of a research line that match a query, best match first.

A query is words, a constant name or a code fragment (or several), read the way the memory reads a change
(daemon.agents.ideas):
- the parts of the query that parse as Python statements other than a bare name or number are normalized
  like a change (`ast.unparse`: formatting and comments do not count) and looked for in each idea's
  normalized changed lines: as a whole changed line (`LINE`), as a fragment of one (`FRAGMENT`), and the same
  two again with UPPER_CASE constant names read as one placeholder (`RENAMED_LINE`, `RENAMED_FRAGMENT`), the
  way the memory recognises renamed constants; each code line of the query counts its best match;
- a name of the query that the idea changes (a module-level constant, a function, a class: `Change.targets`)
  adds `NAME` (case does not count);
- each distinct word of the query (identifiers whole and split at underscores, numbers as `%g`, lower case,
  common words left out) found among the idea's words (its description and changed lines) adds `WORD`; a word
  of 4 or more letters that only begins one of them adds `PREFIX`.
An idea with no match is not a hit (an empty query lists every idea). The outcome filter keeps one outcome,
or a group: `refused` (discarded, did not hold), `failed` (crashed, timeout, oom, invalid). Ties go to ideas
measured under the current measurement version, then to the newest: the same memory and query always give
the same answer.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from daemon import syntax
from daemon.agents.ideas import Idea, IdeaMemory, normalized_lines

LINE = 8.0
FRAGMENT = 5.0
RENAMED_LINE = 4.0
RENAMED_FRAGMENT = 3.0
NAME = 3.0
WORD = 1.0
PREFIX = 0.5
MIN_PREFIX = 4
OUTCOME_GROUPS: dict[str, tuple[str, ...]] = {
    "kept": ("kept",), "discarded": ("discarded",), "did not hold": ("did not hold",), "crashed": ("crashed",),
    "timeout": ("timeout",), "oom": ("oom",), "invalid": ("invalid",),
    "refused": ("discarded", "did not hold"), "failed": ("crashed", "timeout", "oom", "invalid"),
}
_STOP_WORDS = frozenset({"the", "an", "and", "or", "of", "to", "in", "for", "with", "on", "is", "it", "by", "as",
                         "at", "from", "self", "def", "return", "import", "none", "true", "false", "if", "else",
                         "not", "try", "tried", "idea", "ideas", "change"})
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?")
_CONSTANT = re.compile(r"\b[A-Z][A-Z0-9_]*[A-Z0-9]\b")
_PLACEHOLDER = "CONST"


@dataclass(frozen=True)
class Hit:
    idea: Idea
    score: float
    matched: tuple[str, ...]  # what matched, in our words (never the query's text)


@dataclass(frozen=True)
class Query:
    """A query read once: its normalized code lines, the names it mentions and its words."""

    code: tuple[str, ...]
    names: frozenset[str]
    words: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not self.code and not self.names and not self.words


def search_ideas(memory: IdeaMemory, query: str, outcome: str | None = None) -> list[Hit]:
    """Every idea of `memory` matching `query` (and `outcome`, a key of `OUTCOME_GROUPS`), best match first."""
    if outcome is not None and outcome not in OUTCOME_GROUPS:
        raise ValueError(f"unknown outcome {outcome!r}")
    wanted = OUTCOME_GROUPS[outcome] if outcome is not None else None
    read = read_query(query)
    hits = []
    for idea in memory.ideas:
        if wanted is not None and idea.outcome not in wanted:
            continue
        hit = _score(idea, read)
        if hit.score > 0 or read.empty:
            hits.append(hit)
    return sorted(hits, key=lambda hit: (-hit.score, hit.idea.version != memory.version,
                                         -hit.idea.experiment_ids[0]))


def read_query(query: str) -> Query:
    """The query's code lines (normalized), names and words."""
    return Query(_code_lines(query), frozenset(name.lower() for name in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", query)),
                 tuple(sorted(words_of(query) - _STOP_WORDS)))


def words_of(text: str) -> set[str]:
    """Lower-case identifiers (whole and split at underscores) and numbers (as `%g`) of `text`."""
    words: set[str] = set()
    for token in _TOKEN.findall(text):
        if token[0].isdigit() or token[0] == ".":
            try:
                words.add(f"{float(token):g}")
            except ValueError:
                continue
            continue
        lowered = token.lower()
        words.update(part for part in (lowered, *lowered.split("_")) if len(part) >= 2)
    return words


def _code_lines(query: str) -> tuple[str, ...]:
    """The normalized lines of the query's code: the whole query when it parses, else each line that does."""
    pieces = [textwrap.dedent(query)]
    if _parsed(pieces[0]) is None:
        pieces = [line.strip() for line in query.splitlines() if line.strip()]
    lines: list[str] = []
    for piece in pieces:
        tree = _parsed(piece)
        if tree is None or all(_bare(statement) for statement in tree.body):
            continue
        try:  # uncached: a query's pieces must not push the memory's sources out of normalized_lines' cache
            normalized = normalized_lines.__wrapped__(piece)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        lines.extend(line.strip() for line in normalized if line.strip())
    return tuple(dict.fromkeys(lines))


def _parsed(text: str) -> ast.Module | None:
    try:
        return syntax.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _bare(statement: ast.stmt) -> bool:
    """A statement that is only a name, a number or a string: a word of the query, not code."""
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Name | ast.Constant)


def _renamed(line: str) -> str:
    return _CONSTANT.sub(_PLACEHOLDER, line)


@lru_cache(maxsize=4096)
def _idea_text(idea: Idea) -> tuple[tuple[str, ...], tuple[str, ...], frozenset[str], frozenset[str]]:
    """(changed lines, the same renamed, names it changes, its words), stripped and lower-cased as needed."""
    lines = tuple(line.strip() for line in (*idea.change.removed, *idea.change.added) if line.strip())
    targets = frozenset(target.removesuffix("()").lower() for target in idea.change.targets)
    words = frozenset(words_of(idea.description) | set().union(*(words_of(line) for line in lines)))
    return lines, tuple(_renamed(line) for line in lines), targets, words


def _score(idea: Idea, query: Query) -> Hit:
    lines, renamed, targets, words = _idea_text(idea)
    score = 0.0
    matched: list[str] = []
    for code in query.code:
        best, kind = _code_match(code, lines, renamed)
        if best:
            score += best
            matched.append(kind)
    names = sorted(query.names & targets)
    if names:
        score += NAME * len(names)
        matched.append(f"{len(names)} name{'s' if len(names) != 1 else ''} it changes")
    found = [word for word in query.words if word in words]
    prefixed = [word for word in query.words if word not in words and len(word) >= MIN_PREFIX
                and any(other.startswith(word) for other in words)]
    if found or prefixed:
        score += WORD * len(found) + PREFIX * len(prefixed)
        matched.append(f"{len(found) + len(prefixed)} of {len(query.words)} words")
    return Hit(idea, score, tuple(dict.fromkeys(matched)))


def _code_match(code: str, lines: Sequence[str], renamed: Sequence[str]) -> tuple[float, str]:
    if code in lines:
        return LINE, "a changed line"
    if any(_contains(line, code) for line in lines):
        return FRAGMENT, "part of a changed line"
    shape = _renamed(code)
    if shape in renamed:
        return RENAMED_LINE, "a changed line, up to constant names"
    if any(_contains(line, shape) for line in renamed):
        return RENAMED_FRAGMENT, "part of a changed line, up to constant names"
    return 0.0, ""


def _contains(line: str, code: str) -> bool:
    """`code` occurs in `line` and does not begin or end inside a name or number there."""
    start = r"(?<!\w)" if _wordy(code[:1]) else ""
    end = r"(?!\w)" if _wordy(code[-1:]) else ""
    return re.search(start + re.escape(code) + end, line) is not None


def _wordy(char: str) -> bool:
    return char.isalnum() or char == "_"
