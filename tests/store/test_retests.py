"""Re-tests in the store (`retests`, `retest_runs`), on SQLite and real Postgres: kept apart from experiments."""

from __future__ import annotations

import pytest

from daemon.errors import StoreError
from daemon.store import Store
from daemon.store.records import SessionRecord


def _kept(store: Store, session: SessionRecord, source: str, val_bpb: float) -> int:
    created = store.create_experiment(session.id, "candidate", source)
    store.claim_next(session.id, "owner", "lane0", None, 60.0)
    store.transition(created.id, "running", "evaluating")
    store.transition(created.id, "evaluating", "kept", val_bpb=val_bpb, commit="abcdef1234")
    return created.id


def test_a_retest_and_its_runs_round_trip(store: Store, session: SessionRecord) -> None:
    """A re-test, its runs in order and its end state read back exactly; experiments are untouched."""
    base, best = _kept(store, session, "a = 1\n", 1.3), _kept(store, session, "a = 2\n", 1.2)
    before = store.list_experiments(session_id=session.id)
    retest = store.create_retest(session.id, "night", base_id=base, best_id=best, budget_s=300.0, k=2)
    assert (retest.status, retest.finished_at) == ("running", None)
    store.add_retest_run(retest.id, "a", base, 1_000_001_000, "measured", 1.2345678901234567)
    store.add_retest_run(retest.id, "b", best, 1_000_001_000, "timeout", None, "over budget")
    store.finish_retest(retest.id, "partial", "1 run failed")
    [done] = store.retests([session.id])
    assert (done.status, done.note, done.k, done.budget_s) == ("partial", "1 run failed", 2, 300.0)
    assert done.finished_at is not None
    runs = store.retest_runs([retest.id])
    assert [(r.arm, r.seed, r.status, r.val_bpb, r.error) for r in runs] == [
        ("a", 1_000_001_000, "measured", 1.2345678901234567, ""), ("b", 1_000_001_000, "timeout", None, "over budget")]
    assert store.list_experiments(session_id=session.id) == before


def test_a_skipped_retest_is_recorded_finished_with_its_reason(store: Store, session: SessionRecord) -> None:
    """`skipped` is a final state with the reason in its note."""
    skipped = store.create_retest(session.id, "night", base_id=None, best_id=None, budget_s=5.0, k=3,
                                  status="skipped", note="the window ended early")
    assert skipped.status == "skipped" and skipped.finished_at is not None and skipped.note == "the window ended early"


@pytest.mark.parametrize("call", [
    lambda s, sid: s.create_retest(sid, "bogus", base_id=None, best_id=None, budget_s=1.0, k=1),
    lambda s, sid: s.create_retest(sid, "night", base_id=None, best_id=None, budget_s=0.0, k=1),
    lambda s, sid: s.create_retest(sid, "night", base_id=None, best_id=None, budget_s=1.0, k=0),
    lambda s, sid: s.create_retest(sid, "night", base_id=None, best_id=None, budget_s=1.0, k=1, status="done"),
])
def test_bad_retests_are_refused(store: Store, session: SessionRecord, call) -> None:  # type: ignore[no-untyped-def]
    """Unknown labels, budgets, k or start states are one-line errors; nothing is written."""
    with pytest.raises(StoreError):
        call(store, session.id)
    assert store.retests([session.id]) == []


@pytest.mark.parametrize(("arm", "value"), [("c", 1.0), ("a", float("nan")), ("b", float("inf"))])
def test_bad_runs_are_refused(store: Store, session: SessionRecord, arm: str, value: float) -> None:
    """A run's arm is a or b and its val_bpb finite (or None)."""
    retest = store.create_retest(session.id, "night", base_id=None, best_id=None, budget_s=1.0, k=1)
    with pytest.raises(StoreError):
        store.add_retest_run(retest.id, arm, None, 1, "measured", value)
    assert store.retest_runs([retest.id]) == []


def test_results_tsv_lists_retest_runs_after_the_nights_rows(store: Store, session: SessionRecord) -> None:
    """Re-test rows carry the run's code (the kept commit), its value (0 for a failed run) and status retest."""
    base = _kept(store, session, "a = 1\n", 1.3)
    retest = store.create_retest(session.id, "keep", base_id=base, best_id=base, budget_s=1.0, k=1)
    store.add_retest_run(retest.id, "a", base, 7, "measured", 1.25)
    store.add_retest_run(retest.id, "b", base, 7, "crashed", None)
    lines = store.results_tsv(session.id).splitlines()
    assert lines[1].split("\t")[3] == "keep"
    assert lines[2].split("\t")[:4] == ["abcdef1", "1.250000", "0.0", "retest"]
    assert lines[3].split("\t")[1] == "0.000000" and lines[3].endswith("seed 7 crashed")
