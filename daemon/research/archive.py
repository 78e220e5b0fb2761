"""The near-miss archive: discarded changes that looked better than the best but did not prove it.

Greedy search forgets a change the moment it is discarded, even when it lost to noise by a hair or
was tried on a best that has since moved. The archive keeps them ranked by how close they came (the
judge's t statistic, stored with each verdict), with their diffs:
- `near_misses(rows)`: the ranking, for the ledger the agent reads and for the report;
- `pick_near_miss(rows, best, seen)`: the planner's near-miss move under `search = archive` — the best
  untried near-miss whose diff still applies to the current best, combined with it (the best's changes
  plus the near-miss's change; the new candidate records both parents: `parent_id` the best,
  `parent2_id` the near-miss);
- `archived_near_miss(rows, experiment_id)`: the near-miss an agent's combine names, or why it is none;
- `reapply(diff, source)` (from `daemon.agents.combine`): a unified diff re-applied onto another source.

Pure functions over store rows.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from daemon.agents.combine import reapply
from daemon.agents.edits import normalized_hash
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


def archived_near_miss(rows: Sequence[ArchiveRow], experiment_id: int) -> NearMiss:
    """The archived near-miss `experiment_id` among `rows`; `InvalidProposal` saying why it is not one."""
    for miss in near_misses(rows, limit=len(rows)):
        if miss.experiment_id == experiment_id:
            return miss
    row = next((row for row in rows if row.id == experiment_id), None)
    if row is None:
        raise InvalidProposal(f"combine: #{experiment_id} is not an experiment of this research line")
    raise InvalidProposal(f"combine: #{experiment_id} ({row.kind}, {row.status}) is not an archived near-miss "
                          "(a discarded change that looked better than the best)")


def unified_diff(parent: str, child: str) -> str:
    """The unified diff of train.py from `parent` to `child` (what the store, the agent and the report show)."""
    return "".join(difflib.unified_diff(parent.splitlines(keepends=True), child.splitlines(keepends=True),
                                        "a/train.py", "b/train.py"))

