"""The parts a research session hands its lanes: the shared `SessionState` and the `ExperimentBoard` (on SQLite)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from daemon.errors import TransitionError
from daemon.research.board import ExperimentBoard
from daemon.research.lanes import Lane
from daemon.research.state import SessionState
from daemon.store import open_store
from daemon.store.sql import Store
from sandbox.spec import RunStatus

LANE = Lane("gpu0", "GPU-0")


def new_state(awaiting: dict[int, Any] | None = None, max_experiments: int | None = None) -> SessionState:
    return SessionState(lock=threading.RLock(), awaiting={} if awaiting is None else awaiting,
                        max_experiments=max_experiments)


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'parts.db'}")
    opened.upgrade()
    yield opened
    opened.close()


def board_of(store: Store, owner: str, session_id: int) -> ExperimentBoard:
    return ExperimentBoard(store=store, owner=owner, lease_seconds=60.0, session_id=lambda: session_id,
                           state=new_state())


def test_crash_streak_counts_until_a_run_is_measured() -> None:
    """`crashed()` returns the crashes in a row; a measured run starts the count again."""
    state = new_state()
    assert [state.crashed(), state.crashed()] == [1, 2]
    state.measured()
    assert state.crashed() == 1 and state.crash_streak == 1


def test_exhausted_once_the_launched_candidates_reach_the_maximum() -> None:
    """With `max_experiments = 2` the session is exhausted after its second launched candidate, never without one."""
    limited, unlimited = new_state(max_experiments=2), new_state()
    limited.candidate_launched()
    assert not limited.exhausted()
    limited.candidate_launched()
    unlimited.candidate_launched()
    assert limited.exhausted() and not unlimited.exhausted()


def test_held_work_covers_running_and_unconfirmed_experiments() -> None:
    """Leases are kept for running experiments and for the keeper's close calls until each is let go."""
    awaiting: dict[int, Any] = {7: "close call"}
    state = new_state(awaiting)
    state.track(3, LANE)
    assert state.held() == [3, 7] and state.in_flight()
    state.untrack(3)
    state.forget_unconfirmed(7)
    assert state.held() == [] and not state.in_flight() and awaiting == {}


def test_kill_all_cancels_each_running_experiment() -> None:
    """A kill sets the reason on every running experiment's cancel handle; an earlier reason is kept."""
    state = new_state()
    state.track(1, LANE)
    state.track(2, Lane("gpu1", "GPU-1"))
    first = state.running(1)
    assert first is not None
    first.cancel.set(RunStatus.PREEMPTED)
    state.kill_all(RunStatus.INTERRUPTED)
    reasons = [running.cancel.reason for running in (state.running(1), state.running(2)) if running is not None]
    assert reasons == [RunStatus.PREEMPTED, RunStatus.INTERRUPTED]


def test_claim_leases_the_next_queued_row_and_tracks_it(store: Store) -> None:
    """A claim takes the oldest queued row for this owner and lane, and the state shows it in flight."""
    session = store.create_session("parts", "once", "program", {})
    queued = store.create_experiment(session.id, "baseline", "print(1)\n")
    board = board_of(store, "daemon-a", session.id)
    claimed = board.claim(LANE)
    assert claimed is not None and claimed.id == queued.id
    assert (claimed.status, claimed.lease_owner, claimed.lane) == ("running", "daemon-a", "gpu0")
    running = board.state.running(queued.id)
    assert running is not None and running.lane == LANE
    assert board.claim(LANE) is None  # nothing else is queued


def test_a_taken_over_run_is_stopped_and_its_transitions_refused(store: Store) -> None:
    """Once another owner holds the row, the first owner sees its lease lost, its run is cancelled and its
    state changes are refused."""
    session = store.create_session("parts", "once", "program", {})
    row = store.create_experiment(session.id, "baseline", "print(1)\n")
    first, second = board_of(store, "daemon-a", session.id), board_of(store, "daemon-b", session.id)
    assert first.claim(LANE) is not None and not first.lease_lost(row.id)
    store.requeue_expired(now=datetime.now(timezone.utc) + timedelta(hours=1))
    assert second.claim(LANE) is not None
    first.stop_if_taken_over(row.id)
    running = first.state.running(row.id)
    assert first.lease_lost(row.id) and running is not None and running.cancel.reason is RunStatus.INTERRUPTED
    with pytest.raises(TransitionError):
        first.transition(row.id, "running", "evaluating")
    assert second.transition(row.id, "running", "evaluating").status == "evaluating"
