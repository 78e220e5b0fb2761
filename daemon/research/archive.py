"""The near-miss archive: discarded changes that looked better than the best but did not prove it.

Greedy search forgets a change the moment it is discarded, even when it lost to noise by a hair or
was tried on a best that has since moved. The archive keeps them ranked by how close they came (the
judge's t statistic, stored with each verdict), with their diffs:
- `near_misses(rows)`: the ranking, for the ledger the agent reads and for the report;
- `pick_near_miss(rows, best, seen)`: the planner's near-miss move under `search = archive` — the best
  untried near-miss whose diff still applies to the current best, combined with it (the best's changes
  plus the near-miss's change; the new candidate records both parents: `parent_id` the best,
  `parent2_id` the near-miss);
- `reapply(diff, source)`: a unified diff's hunks re-applied as search/replace edits onto another source.

Pure functions over store rows.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from daemon.agents import Edit
from daemon.agents.edits import apply_edits, normalized_hash
from daemon.errors import InvalidProposal


class ArchiveRow(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def parent_id(self) -> int | None: ...
    @property
    def parent2_id(self) -> int | None: ...
    @property
    def description(self) -> str: ...
    @property
    def diff(self) -> str: ...
    @property
    def verdict(self) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class NearMiss:
    experiment_id: int
    parent_id: int | None
    description: str
    improvement: float  # best mean - its mean, at its verdict (positive: it looked better)
    t: float
    sigma: float
    n: int
    diff: str


def near_misses(rows: Iterable[ArchiveRow], limit: int = 10) -> list[NearMiss]:
    """Discarded candidates that looked better than the best (t > 0 at their verdict), closest call first."""
    found: list[NearMiss] = []
    for row in rows:
        verdict = row.verdict or {}
        t = verdict.get("t")
        if row.kind not in ("candidate", "manual") or row.status != "discarded" or not isinstance(t, int | float):
            continue
        if t <= 0 or not row.diff.strip():
            continue
        found.append(NearMiss(row.id, row.parent_id, row.description, float(verdict.get("improvement", 0.0)),
                              float(t), float(verdict.get("sigma", 0.0)), int(verdict.get("n", 1)), row.diff))
    found.sort(key=lambda miss: (-miss.t, miss.experiment_id))
    return found[:limit]


def pick_near_miss(rows: Sequence[ArchiveRow], best: ArchiveRow, best_source: str,
                   seen_hashes: set[str]) -> tuple[NearMiss, str] | None:
    """The best near-miss not yet re-tried, made against an older best, whose diff applies to the best now.

    Returns it with the combined source (the best's source with the near-miss's change), or None.
    """
    retried = {row.parent2_id for row in rows if row.parent2_id is not None}
    for miss in near_misses(rows, limit=len(rows)):
        if miss.experiment_id in retried or miss.parent_id == best.id:
            continue  # judged against this very best already, or re-tried before
        try:
            source = reapply(miss.diff, best_source)
        except InvalidProposal:
            continue
        if normalized_hash(source) in seen_hashes:
            continue
        return miss, source
    return None


def reapply(diff: str, source: str) -> str:
    """Apply a unified diff's hunks to `source` as search/replace edits (each hunk's old text must occur once)."""
    edits = [edit for edit in _hunks(diff) if edit.search != edit.replace]
    if not edits:
        raise InvalidProposal("the diff has no change to re-apply")
    if any(not edit.search for edit in edits):
        raise InvalidProposal("a hunk without context or removed lines cannot be placed in another source")
    return apply_edits(source, edits)


def unified_diff(parent: str, child: str) -> str:
    """The unified diff of train.py from `parent` to `child` (what the store, the agent and the report show)."""
    return "".join(difflib.unified_diff(parent.splitlines(keepends=True), child.splitlines(keepends=True),
                                        "a/train.py", "b/train.py"))


def _hunks(diff: str) -> list[Edit]:
    edits: list[Edit] = []
    old: list[str] | None = None
    new: list[str] = []
    for line in diff.splitlines(keepends=True):
        if line.startswith("@@"):
            if old is not None:
                edits.append(Edit("".join(old), "".join(new)))
            old, new = [], []
        elif old is None:
            continue  # the ---/+++ header before the first hunk
        elif line.startswith(" "):
            old.append(line[1:])
            new.append(line[1:])
        elif line.startswith("-"):
            old.append(line[1:])
        elif line.startswith("+"):
            new.append(line[1:])
        elif line.startswith("\\"):
            continue  # "\ No newline at end of file"
        else:
            raise InvalidProposal(f"not a unified diff line: {line[:80]!r}")
    if old is not None:
        edits.append(Edit("".join(old), "".join(new)))
    return edits
