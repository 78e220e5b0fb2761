"""The near-miss archive (`daemon.research.archive`): ranking, re-applying a diff on a new best, the move."""

from __future__ import annotations

import pytest

from daemon.agents.edits import normalized_hash
from daemon.errors import InvalidProposal
from daemon.research.archive import near_misses, pick_near_miss, reapply, unified_diff
from tests.daemon.rows import row

BASE = "".join(f"a{i} = {i}\n" for i in range(30))


def _with(source: str, line: str, new: str) -> str:
    assert source.count(line) == 1
    return source.replace(line, new)


def _miss(row_id: int, t: float, parent_id: int, source: str, **fields: object) -> object:
    return row(row_id, "candidate", "discarded", 0.99, parent_id=parent_id, diff=unified_diff(BASE, source),
               description=f"idea {row_id}", verdict={"t": t, "improvement": 0.01, "sigma": 0.01, "n": 2}, **fields)


def test_reapply_moves_a_change_onto_another_source() -> None:
    """A diff made against the baseline applies to a best that changed elsewhere."""
    near = _with(BASE, "a3 = 3\n", "a3 = 33\n")
    best = _with(BASE, "a20 = 20\n", "a20 = 200\n")
    combined = reapply(unified_diff(BASE, near), best)
    assert "a3 = 33\n" in combined and "a20 = 200\n" in combined


def test_reapply_refuses_a_conflict() -> None:
    """When the best changed the lines the diff touches, it does not apply."""
    near = _with(BASE, "a3 = 3\n", "a3 = 33\n")
    best = _with(BASE, "a3 = 3\n", "a3 = 4\n")
    with pytest.raises(InvalidProposal):
        reapply(unified_diff(BASE, near), best)


def test_near_misses_rank_discarded_changes_that_looked_better() -> None:
    """Only discarded candidates with t > 0 count, closest call first."""
    rows = [_miss(2, 1.2, 1, _with(BASE, "a1 = 1\n", "a1 = 9\n")),
            _miss(3, 2.1, 1, _with(BASE, "a2 = 2\n", "a2 = 9\n")),
            _miss(4, -0.5, 1, _with(BASE, "a4 = 4\n", "a4 = 9\n")),
            row(5, "candidate", "kept", 0.9, diff="x", verdict={"t": 5.0})]
    assert [miss.experiment_id for miss in near_misses(rows)] == [3, 2]


def test_pick_combines_the_best_near_miss_with_the_new_best() -> None:
    """The top near-miss made against an older best is re-applied onto the current best's source."""
    best_source = _with(BASE, "a25 = 25\n", "a25 = 0\n")
    best = row(6, "candidate", "kept", 0.95, parent_id=1, source=best_source)
    rows = [_miss(2, 1.2, 1, _with(BASE, "a1 = 1\n", "a1 = 9\n")), _miss(3, 2.1, 1, _with(BASE, "a2 = 2\n", "a2 = 9\n")),
            best]
    picked = pick_near_miss(rows, best, best_source, set())
    assert picked is not None
    miss, source = picked
    assert miss.experiment_id == 3 and "a2 = 9\n" in source and "a25 = 0\n" in source


def test_pick_skips_retried_same_best_and_seen_sources() -> None:
    """A near-miss judged against this very best, one re-tried before, or a combination already run is skipped."""
    best_source = _with(BASE, "a25 = 25\n", "a25 = 0\n")
    best = row(6, "candidate", "kept", 0.95, parent_id=1, source=best_source)
    same_best = _miss(7, 3.0, 6, _with(best_source, "a5 = 5\n", "a5 = 9\n"))
    retried = _miss(3, 2.1, 1, _with(BASE, "a2 = 2\n", "a2 = 9\n"))
    retry_row = row(8, "candidate", "discarded", 0.97, parent_id=6, parent2_id=3)
    seen = _miss(2, 1.2, 1, _with(BASE, "a1 = 1\n", "a1 = 9\n"))
    seen_hash = normalized_hash(_with(best_source, "a1 = 1\n", "a1 = 9\n"))
    assert pick_near_miss([same_best, retried, retry_row, seen, best], best, best_source, {seen_hash}) is None
