"""Experiment and session state changes: allowed ones, refused ones, and that a refusal changes nothing."""

from __future__ import annotations

import hashlib
from datetime import timezone

import pytest

from daemon.errors import StoreError, TransitionError
from daemon.store import Store
from daemon.store.records import TRANSITIONS, ExperimentRecord, SessionRecord

SOURCE = "import torch\nprint('train')\n"


def _running(store: Store, session: SessionRecord, owner: str = "host-a:1") -> ExperimentRecord:
    store.create_experiment(session.id, "candidate", SOURCE)
    claimed = store.claim_next(session.id, owner, "lane0", "GPU-0", 60)
    assert claimed is not None
    return claimed


def test_create_experiment_is_queued_with_hashes(store: Store, session: SessionRecord) -> None:
    """A new experiment is queued, stores the raw-source sha256 and the caller's normalized hash."""
    record = store.create_experiment(session.id, "candidate", SOURCE, description="lr up", seed=3,
                                     source_hash="n" * 64)
    assert record.status == "queued"
    assert record.source_sha256 == hashlib.sha256(SOURCE.encode()).hexdigest()
    assert record.source_hash == "n" * 64
    assert (record.seed, record.attempt, record.description) == (3, 1, "lr up")
    assert record.created_at.tzinfo == timezone.utc
    assert record.started_at is None and record.lease_owner is None


def test_full_life_sets_timestamps_and_results(store: Store, session: SessionRecord) -> None:
    """queued -> running -> evaluating -> kept records results, started_at and finished_at."""
    running = _running(store, session)
    evaluating = store.transition(running.id, "running", "evaluating", training_seconds=300.1, peak_vram_mb=45060.2)
    assert evaluating.finished_at is None
    kept = store.transition(running.id, "evaluating", "kept", val_bpb=0.9979, commit="abc1234def", probe="passed")
    assert kept.status == "kept"
    assert (kept.val_bpb, kept.training_seconds, kept.commit) == (0.9979, 300.1, "abc1234def")
    assert kept.started_at is not None and kept.finished_at is not None
    assert kept.finished_at >= kept.started_at


@pytest.mark.parametrize(("source_status", "new"),
                         [(s, n) for s, targets in TRANSITIONS.items() for n in sorted(targets)])
def test_allowed_transition(store: Store, session: SessionRecord, source_status: str, new: str) -> None:
    """Every transition of the contract's graph is accepted."""
    record = store.create_experiment(session.id, "candidate", SOURCE) if source_status == "queued" else (
        _running(store, session))
    if source_status == "evaluating":
        store.transition(record.id, "running", "evaluating")
    moved = store.transition(record.id, source_status, new, error="x" if new == "crashed" else "")
    assert moved.status == new
    assert (moved.finished_at is None) == (new == "evaluating")


def test_wrong_state_raises_and_changes_nothing(store: Store, session: SessionRecord) -> None:
    """A transition from a state the experiment is not in names id, expected and actual, and changes nothing."""
    record = store.create_experiment(session.id, "candidate", SOURCE)
    with pytest.raises(TransitionError) as caught:
        store.transition(record.id, "evaluating", "kept", val_bpb=0.5)
    message = str(caught.value)
    assert f"experiment {record.id}" in message and "'queued'" in message and "evaluating" in message
    assert store.get_experiment(record.id) == record


def test_transition_already_done_is_refused(store: Store, session: SessionRecord) -> None:
    """Repeating a finished transition (the state moved on) raises instead of writing twice."""
    record = _running(store, session)
    store.transition(record.id, "running", "crashed", error="boom")
    with pytest.raises(TransitionError):
        store.transition(record.id, "running", "crashed", error="second")
    assert store.get_experiment(record.id).error == "boom"  # type: ignore[union-attr]


def test_illegal_edge_raises(store: Store, session: SessionRecord) -> None:
    """An edge outside the graph (queued -> kept) is refused before touching the database."""
    record = store.create_experiment(session.id, "candidate", SOURCE)
    with pytest.raises(TransitionError, match="not an allowed transition"):
        store.transition(record.id, "queued", "kept")
    assert store.get_experiment(record.id) == record


def test_unknown_status_raises(store: Store, session: SessionRecord) -> None:
    """A status name outside the contract is a clear StoreError."""
    record = _running(store, session)
    with pytest.raises(StoreError, match="unknown experiment status"):
        store.transition(record.id, "running", "exploded")


def test_unknown_field_raises_and_changes_nothing(store: Store, session: SessionRecord) -> None:
    """Setting a field a transition may not set is refused; the experiment keeps its state."""
    record = _running(store, session)
    with pytest.raises(StoreError, match="cannot set session_id"):
        store.transition(record.id, "running", "evaluating", session_id=99)
    assert store.get_experiment(record.id) == record


def test_missing_experiment_raises(store: Store, session: SessionRecord) -> None:
    """A transition of an id that does not exist says so."""
    with pytest.raises(StoreError, match="experiment 987654321 does not exist"):
        store.transition(987654321, "running", "crashed")


def test_owner_guard_refuses_other_owner(store: Store, session: SessionRecord) -> None:
    """With owner=, a lane that no longer holds the lease cannot finish the experiment."""
    record = _running(store, session, owner="host-a:1")
    with pytest.raises(TransitionError, match="leased to 'host-b:2'"):
        store.transition(record.id, "running", "crashed", owner="host-b:2")
    assert store.transition(record.id, "running", "crashed", owner="host-a:1").status == "crashed"


def test_create_experiment_rejects_unknown_kind(store: Store, session: SessionRecord) -> None:
    """An unknown kind is refused and nothing is inserted."""
    with pytest.raises(StoreError, match="unknown experiment kind 'wild'"):
        store.create_experiment(session.id, "wild", SOURCE)
    assert store.list_experiments(session.id) == []


def test_create_experiment_rejects_empty_source(store: Store, session: SessionRecord) -> None:
    """An empty candidate source is refused."""
    with pytest.raises(StoreError, match="source is empty"):
        store.create_experiment(session.id, "candidate", "  \n")


def test_create_experiment_rejects_missing_session(store: Store) -> None:
    """An experiment of a session that does not exist is refused with the session's id."""
    with pytest.raises(StoreError, match="session 987654321 does not exist"):
        store.create_experiment(987654321, "candidate", SOURCE)


def test_create_experiment_rejects_missing_parent(store: Store, session: SessionRecord) -> None:
    """A parent id that does not exist is refused and nothing is inserted."""
    with pytest.raises(StoreError, match="experiment 987654321 does not exist"):
        store.create_experiment(session.id, "candidate", SOURCE, parent_id=987654321)
    assert store.list_experiments(session.id) == []


def test_end_session_sets_status_and_end(store: Store, session: SessionRecord) -> None:
    """Ending a session records its final status and ended_at."""
    ended = store.end_session(session.id, "finished")
    assert ended.status == "finished" and ended.ended_at is not None
    assert store.get_session(session.id) == ended


def test_end_session_twice_raises(store: Store, session: SessionRecord) -> None:
    """A session ends once; the second end raises and keeps the first status."""
    store.end_session(session.id, "finished")
    with pytest.raises(TransitionError, match="'finished'"):
        store.end_session(session.id, "stopped")
    assert store.get_session(session.id).status == "finished"  # type: ignore[union-attr]


def test_end_session_rejects_bad_status(store: Store, session: SessionRecord) -> None:
    """An empty end status is refused."""
    with pytest.raises(StoreError, match="end status"):
        store.end_session(session.id, "")


def test_create_session_rejects_unserializable_config(store: Store) -> None:
    """A config that is not JSON is refused with what to pass instead; no session is created."""
    with pytest.raises(StoreError, match="not JSON-serializable"):
        store.create_session("t", "manual", "p", {"path": object()})
    assert store.list_sessions() == []


def test_pool_clean_after_refused_transition(store: Store, session: SessionRecord) -> None:
    """A refused transition returns its connection to the pool."""
    record = store.create_experiment(session.id, "candidate", SOURCE)
    with pytest.raises(TransitionError):
        store.transition(record.id, "running", "crashed")
    assert store.engine.pool.checkedout() == 0
