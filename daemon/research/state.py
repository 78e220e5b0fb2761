"""What the parts of one research session share: its lock, the experiments in flight, the counters.

`SessionState` belongs to one `ResearchSession`; the driver, `work.WorkSource` (what runs next) and
`running.Execution` (one experiment through the sandbox) read and change it through named methods:
- the experiments in flight (`track`, `running`, `untrack`, `kill_all`) and the close calls waiting for
  their confirmation runs (the keeper's map: `unconfirmed`, `forget_unconfirmed`);
- the streaks that end a session (`crashed`, `sandbox_failed`, `proposal_unusable`, `agent_failed`, each
  returning the streak, and their resets) and the reason it must stop (`fail`, `fatal`);
- GPUs quarantined after a kill, candidates that are the agent's fix of a crash, and the counts of
  planned and launched candidates (`exhausted`: `once -n N` has launched its N).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from daemon.ops.logs import get_logger
from daemon.research.lanes import Lane
from sandbox.spec import Cancel, RunStatus

log = get_logger("autoresearch.research")


@dataclass
class Running:
    """A lane's experiment in flight: its cancel handle and start time."""

    lane: Lane
    cancel: Cancel
    started: float


class SessionState:
    """The shared state of one session (see the module docstring); `lock` guards it."""

    def __init__(self, *, lock: threading.RLock, awaiting: dict[int, Any], max_experiments: int | None) -> None:
        self.lock = lock
        self._awaiting = awaiting  # the keeper's close calls waiting for confirmation runs
        self._running: dict[int, Running] = {}
        self.max_experiments = max_experiments
        self.planned_candidates = 0  # candidates planned by this session object (archive turns count them)
        self.launched_candidates = 0
        self._crash_streak = 0
        self._infra_streak = 0  # sandbox failures in a row (engine down, bad limits): not the candidate's fault
        self._invalid_streak = 0
        self._agent_error_streak = 0  # plain agent failures in a row (network, server errors)
        self._quarantined: set[str] = set()  # GPUs whose memory did not come back after a killed run
        self._fix_attempts: set[int] = set()
        self._fatal: str | None = None

    # -- experiments in flight ---------------------------------------------------------------------

    def track(self, experiment_id: int, lane: Lane) -> None:
        """A claimed experiment is in flight on `lane` (with a fresh cancel handle)."""
        with self.lock:
            self._running[experiment_id] = Running(lane, Cancel(), time.monotonic())

    def running(self, experiment_id: int) -> Running | None:
        with self.lock:
            return self._running.get(experiment_id)

    def untrack(self, experiment_id: int) -> None:
        with self.lock:
            self._running.pop(experiment_id, None)

    def in_flight(self) -> bool:
        """Whether an experiment runs or a close call waits for its confirmation."""
        with self.lock:
            return bool(self._running) or bool(self._awaiting)

    def held(self) -> list[int]:
        """The experiments whose leases this session keeps: running ones and unconfirmed close calls."""
        with self.lock:
            return [*self._running, *self._awaiting]

    def unconfirmed(self) -> list[int]:
        with self.lock:
            return list(self._awaiting)

    def forget_unconfirmed(self, experiment_id: int) -> None:
        """Another owner took the close call over: it is no longer ours to confirm."""
        with self.lock:
            self._awaiting.pop(experiment_id, None)

    def kill_all(self, reason: RunStatus) -> None:
        with self.lock:
            for running in self._running.values():
                if running.cancel.reason is None:
                    log.warning("killing the running experiment", lane=running.lane.name, reason=reason.value)
                    running.cancel.set(reason)

    # -- what ends a session -----------------------------------------------------------------------

    @property
    def fatal(self) -> str | None:
        """Why the session must stop (a broken set-up, a stuck agent), or None."""
        return self._fatal

    def fail(self, reason: str) -> None:
        self._fatal = reason

    @property
    def crash_streak(self) -> int:
        return self._crash_streak

    def crashed(self) -> int:
        """A candidate crashed: the crashes in a row."""
        self._crash_streak += 1
        return self._crash_streak

    def measured(self) -> None:
        """A run was measured: the crash streak ends."""
        self._crash_streak = 0

    def sandbox_failed(self) -> int:
        """The sandbox failed a run (infra_error): the sandbox failures in a row."""
        self._infra_streak += 1
        return self._infra_streak

    def sandbox_ran(self) -> None:
        self._infra_streak = 0

    def proposal_unusable(self) -> int:
        """A proposal could not be used: the unusable proposals in a row."""
        self._invalid_streak += 1
        return self._invalid_streak

    def proposal_usable(self) -> None:
        self._invalid_streak = 0

    def agent_failed(self) -> int:
        """The agent call failed (network, server error): the failures in a row."""
        self._agent_error_streak += 1
        return self._agent_error_streak

    def agent_answered(self) -> None:
        self._agent_error_streak = 0

    # -- GPUs, fixes, candidates -------------------------------------------------------------------

    def quarantine(self, gpu_uuid: str) -> None:
        self._quarantined.add(gpu_uuid)

    def quarantined(self, gpu_uuid: str | None) -> bool:
        return gpu_uuid in self._quarantined

    def mark_fix(self, experiment_id: int) -> None:
        """The candidate is the agent's fix of a crash: it gets no fix attempt of its own."""
        self._fix_attempts.add(experiment_id)

    def is_fix(self, experiment_id: int) -> bool:
        return experiment_id in self._fix_attempts

    def candidate_planned(self) -> None:
        self.planned_candidates += 1

    def candidate_launched(self) -> None:
        self.launched_candidates += 1

    def exhausted(self) -> bool:
        """`max_experiments` candidates were launched."""
        return self.max_experiments is not None and self.launched_candidates >= self.max_experiments
