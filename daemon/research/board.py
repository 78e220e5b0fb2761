"""The experiment board: a session's rows in the store as its lanes see them.

`ExperimentBoard` claims the next queued row for a lane under this owner's lease (and tracks it as in
flight in the `state.SessionState`), changes the state of a leased row (refused once another owner took
it over), says whether a lease was lost, renews the leases of what is held, and keeps the status page's
view of each lane current.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from daemon.ops.logs import get_logger
from daemon.ops.statuspage import LiveState
from daemon.research.lanes import Lane
from daemon.research.state import SessionState
from daemon.store.records import ExperimentRecord
from sandbox.spec import RunStatus

log = get_logger("autoresearch.research")


class ExperimentBoard:
    """Claims, leased transitions and lane display of one session (see the module docstring)."""

    def __init__(self, *, store: Any, owner: str, lease_seconds: float, session_id: Callable[[], int],
                 state: SessionState, live: LiveState | None = None) -> None:
        self.store = store
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.session_id = session_id
        self.state = state
        self.live = live

    def claim(self, lane: Lane) -> ExperimentRecord | None:
        """The next queued experiment of the session, leased to this owner and in flight on `lane`."""
        record: ExperimentRecord | None = self.store.claim_next(
            self.session_id(), self.owner, lane.name, lane.gpu_uuid, self.lease_seconds)
        if record is not None:
            self.state.track(record.id, lane)
        return record

    def transition(self, experiment_id: int, expected: str | tuple[str, ...], new: str,
                   **fields: Any) -> ExperimentRecord:
        """A state change of one of our leased rows: refused (TransitionError) once another owner took it over."""
        record: ExperimentRecord = self.store.transition(experiment_id, expected, new, owner=self.owner, **fields)
        return record

    def lease_lost(self, experiment_id: int) -> bool:
        current = self.store.get_experiment(experiment_id)
        return current is not None and current.lease_owner != self.owner

    def show_lane(self, lane: Lane, state: str, experiment: ExperimentRecord | None = None,
                  reason: str = "") -> None:
        """Keep the status page's view of the lane current."""
        if self.live is not None:
            self.live.set_lane(lane.name, lane.gpu_uuid, state,
                               experiment_id=experiment.id if experiment is not None else None,
                               description=experiment.description if experiment is not None else "", reason=reason)

    def renew_leases(self) -> None:
        for experiment_id in self.state.held():
            try:
                self.store.renew_lease(experiment_id, self.owner, self.lease_seconds)
            except Exception as exc:  # a DB hiccup: the next renewal tries again well before expiry
                log.warning("lease renewal failed", experiment_id=experiment_id, error=str(exc)[:200])
                self.stop_if_taken_over(experiment_id)

    def stop_if_taken_over(self, experiment_id: int) -> None:
        """Another daemon owns this experiment now (our lease expired): stop running our copy of it."""
        try:
            lost = self.lease_lost(experiment_id)
        except Exception:  # the database is still away; the next renewal looks again
            return
        if lost:
            running = self.state.running(experiment_id)
            if running is not None and running.cancel.reason is None:
                log.warning("lease taken over by another owner; stopping our run", experiment_id=experiment_id)
                running.cancel.set(RunStatus.INTERRUPTED)
