"""The session driver: one thread per lane, the stop condition, leases, the heartbeat, the live status.

Work is done in small steps (`ResearchSession.step(lane, stop)`), each running at most one experiment
on one lane and returning whether there may be more work; `run(stop)` drives one thread per lane and
watches the stop condition (grace period, kill), leases and the heartbeat. Tests call `step` directly.

What runs next is the planner's call (`daemon.research.planner`): queued rows first (retries,
confirmations, re-measures), then the baseline, the noise floor, a re-measure of the best when due, then a
candidate from `daemon.research.work` (the agent's proposals, pipelined by `proposer.Proposer` and
rebased onto a new best; near-miss moves; work an earlier session left unfinished). One claimed
experiment is run by `daemon.research.running.Execution`, and its number is recorded and judged by
`daemon.research.keeper.Keeper` (`daemon.research.judge` is the rule). The parts share the session's
`daemon.research.state.SessionState` (lock, experiments in flight, streaks, the fatal reason) and change
rows through its `daemon.research.board.ExperimentBoard` (claims, leased transitions, the lanes' display);
each is handed its collaborators when the session is built, and none reads the driver's own fields.

Every state change goes through the store with the expected previous state; an experiment that
fails for a reason of ours (sandbox down, database gone) is pushed back (marked `interrupted`, a
copy queued with attempt + 1) before the error is re-raised, so nothing is lost.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from daemon.agents import Agent
from daemon.config import Settings
from daemon.errors import (
    TransitionError,
    WorkspaceError,
)
from daemon.ops.logs import get_logger
from daemon.ops.statuspage import LiveState
from daemon.research.archive import unified_diff
from daemon.research.board import ExperimentBoard
from daemon.research.briefing import Briefing, RepeatGuard
from daemon.research.keeper import Keeper
from daemon.research.lanes import Lane, LaunchGate
from daemon.research.line import (
    join_research_line,
)
from daemon.research.proposer import Prepared, Proposer
from daemon.research.running import (
    ACTIVE,
    CRASH_STATUSES,
    MAX_ATTEMPTS,
    Execution,
    Runner,
    outcome_fields,
)
from daemon.research.smoke import SmokeTest, smoke_stage_runner
from daemon.research.state import SessionState
from daemon.research.stop import StopCondition
from daemon.research.work import MAX_INVALID_PROPOSALS, WorkSource
from daemon.research.workspace import Workspace
from daemon.store.records import SESSION_OPEN, SessionRecord
from sandbox.spec import RunStatus

__all__ = ["ACTIVE", "CRASH_STATUSES", "MAX_ATTEMPTS", "MAX_INVALID_PROPOSALS", "Prepared", "Proposer",
           "ResearchSession", "SessionSummary", "outcome_fields", "unified_diff"]

log = get_logger("autoresearch.research")


class Heartbeat(Protocol):
    def beat(self) -> None: ...


@dataclass
class SessionSummary:
    session_id: int
    tag: str
    stop_reason: str
    status: str  # completed | interrupted | failed
    counts: dict[str, int] = field(default_factory=dict)
    baseline_val_bpb: float | None = None
    best_val_bpb: float | None = None


class ResearchSession:
    """One research session (a night, a window, an `autoresearch once`) over one or more lanes."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Any,
        workspace: Workspace,
        runner: Runner,
        agent: Agent,
        lanes: list[Lane],
        owner: str,
        metrics: Any = None,
        heartbeat: Heartbeat | None = None,
        gate: LaunchGate | None = None,
        trigger: str = "once",
        max_experiments: int | None = None,
        lease_seconds: float = 90.0,
        cost_since: datetime | None = None,
        pipelined: bool = True,
        live: LiveState | None = None,
    ) -> None:
        if not lanes:
            raise ValueError("a research session needs at least one lane")
        self.settings = settings
        self.store = store
        self.workspace = workspace
        self.runner = runner
        self.agent = agent
        self.lanes = lanes
        self.owner = owner
        self.metrics = metrics
        self.heartbeat = heartbeat
        self.gate = gate
        self.trigger = trigger
        self.max_experiments = max_experiments
        self.lease_seconds = lease_seconds
        self.cost_since = cost_since
        self.pipelined = pipelined
        self.live = live
        self.session: SessionRecord | None = None
        self._ends_session = False  # only a session this object created (or adopted) is ended by it
        self._program_md = ""
        self._line: int | None = None  # the research line (see daemon.research.line)
        smoke_runner = smoke_stage_runner(runner, settings) if settings.training.smoke else None
        self._smoke = SmokeTest(smoke_runner, store, settings.training.smoke_repair_rounds, metrics) \
            if smoke_runner is not None else None
        self._build_parts()

    def _build_parts(self) -> None:
        """The session's parts, each handed the collaborators it works with (see the module docstring)."""
        lock = threading.RLock()
        self.keeper = Keeper(settings=self.settings, store=self.store, workspace=self.workspace, owner=self.owner,
                             session_id=lambda: self.session_id,
                             tag=lambda: self.session.tag if self.session else "session", lock=lock,
                             metrics=self.metrics)
        self.state = SessionState(lock=lock, awaiting=self.keeper.awaiting, max_experiments=self.max_experiments)
        self.board = ExperimentBoard(store=self.store, owner=self.owner, lease_seconds=self.lease_seconds,
                                     session_id=lambda: self.session_id, state=self.state, live=self.live)
        repeats = RepeatGuard(self.store, lambda: self.line_id)
        self.briefing = Briefing(settings=self.settings, store=self.store, workspace=self.workspace,
                                 lanes=self.lanes, runner=self.runner, repeats=repeats,
                                 session_id=lambda: self.session_id, line_id=lambda: self.line_id,
                                 program_md=lambda: self._program_md, cost_since=self.cost_since)
        self.work = WorkSource(settings=self.settings, store=self.store, workspace=self.workspace, state=self.state,
                               board=self.board, briefing=self.briefing, repeats=repeats, agent=self.agent,
                               session_id=lambda: self.session_id, line_id=lambda: self.line_id,
                               pipelined=self.pipelined, smoke=self._smoke)
        self.execution = Execution(settings=self.settings, store=self.store, workspace=self.workspace,
                                   runner=self.runner, state=self.state, board=self.board, keeper=self.keeper,
                                   session_id=lambda: self.session_id, proposer=self.work.proposer, gate=self.gate,
                                   metrics=self.metrics)

    # -- session life --------------------------------------------------------------------------

    @property
    def line_id(self) -> int:
        if self._line is None:
            raise RuntimeError("ResearchSession.open() was not called")
        return self._line

    @property
    def session_id(self) -> int:
        if self.session is None:
            raise RuntimeError("ResearchSession.open() was not called")
        return self.session.id

    def open(self, *, resume: bool = True, attach_to: int | None = None,
             orphans: tuple[int, ...] = (), adopt: bool = False) -> SessionRecord:
        """Resume the latest open session (after a crash of the daemon) or start a new one.

        `attach_to` joins an existing session (ended or not) to add work to it (`autoresearch try`);
        `orphans` are experiments that start-up reconciliation marked interrupted: in a resumed
        session a copy of each is queued again, so the interrupted work is redone.
        A joined or resumed session belongs to whoever opened it, so `run` leaves it open, unless
        `adopt` (the daemon taking over the session its crashed predecessor left open).
        """
        self._program_md = self.workspace.program_md()
        if attach_to is not None:
            session = self.store.get_session(attach_to)
            if session is None:
                raise WorkspaceError(f"session {attach_to} does not exist", hint="see `autoresearch status`")
        else:
            latest = self.store.latest_session() if resume else None
            if latest is not None and latest.status == SESSION_OPEN:
                session = latest
                self._ends_session = adopt
                log.info("resuming the open session", session=session.id, tag=session.tag)
            else:
                tag = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
                session = self.store.create_session(tag, self.trigger, self._program_md, self._config_snapshot())
                self._ends_session = True
                log.info("session started", session=session.id, tag=tag, lanes=[lane.name for lane in self.lanes])
        self.session = session
        self._line = join_research_line(self.store, session.id, self.settings.agent.continue_line)
        if self.live is not None:
            self.live.set_session(session.id)
            for lane in self.lanes:
                self.board.show_lane(lane, "idle")
        for experiment_id in orphans:
            record = self.store.get_experiment(experiment_id)
            if record is not None and record.session_id == session.id:
                self.execution.retry_copy(record, "redoing work interrupted by a daemon crash")
        self.work.open(carry_over=attach_to is None)
        self._publish_known_numbers()
        return session

    def _config_snapshot(self) -> dict[str, Any]:
        # Secrets (the API key, the database URL's password) stay out of the database.
        return self.settings.public_snapshot()

    def _publish_known_numbers(self) -> None:
        if self.metrics is None:
            return
        baseline = self.store.baseline(self.session_id)
        if baseline is not None and baseline.val_bpb is not None:
            self.metrics.baseline(baseline.val_bpb)
        self.keeper.publish()
        self.metrics.training_budget_seconds.set(self.settings.training.time_budget_s)

    def run(self, stop: StopCondition) -> SessionSummary:
        """Run every lane until the stop condition (or lack of work) ends them; then end the session."""
        if self.session is None:
            self.open()
        errors: list[BaseException] = []

        def lane_main(lane: Lane) -> None:
            try:
                while self.step(lane, stop):
                    pass
            except BaseException as exc:  # one lane's failure stops the session; re-raised below
                errors.append(exc)
                stop.request_stop(f"lane {lane.name} failed: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=lane_main, args=(lane,), name=f"lane-{lane.name}", daemon=True)
                   for lane in self.lanes]
        for thread in threads:
            thread.start()
        last_renewal = time.monotonic()
        try:
            while any(thread.is_alive() for thread in threads):
                self._beat()
                if stop.kill_due():
                    self.state.kill_all(RunStatus.INTERRUPTED)
                if time.monotonic() - last_renewal >= self.lease_seconds / 4:
                    self.board.renew_leases()
                    last_renewal = time.monotonic()
                for thread in threads:
                    thread.join(timeout=0.2)
        finally:
            if self._smoke is not None:
                self._smoke.close()
            self.work.close()
            for lane in self.lanes:
                self.board.show_lane(lane, "stopped", reason=stop.reason() or "")
        reason = stop.reason() or ("experiment count reached" if self.state.exhausted() else "no more work")
        for candidate_id in self.state.unconfirmed():
            try:
                self.keeper.interrupt(candidate_id, f"the session ended before its confirmation run ({reason})")
            except Exception as exc:  # the lease expires and start-up reconciliation finds it
                log.error("could not interrupt an unconfirmed candidate", experiment_id=candidate_id,
                          error=str(exc)[:300])
        fatal = self.state.fatal
        status = "failed" if (errors or fatal) else ("interrupted" if stop.signalled() else "completed")
        summary = self.summary(fatal or reason, status)
        if self._ends_session:
            self._end_session(status)
        log.info("session ended", session=self.session_id, reason=summary.stop_reason, status=status,
                 counts=summary.counts, best_val_bpb=summary.best_val_bpb)
        if errors:
            raise errors[0]
        return summary

    def _end_session(self, status: str) -> None:
        try:
            self.store.end_session(self.session_id, status)
        except TransitionError as exc:  # someone else ended it meanwhile (a `once` beside the daemon)
            log.warning("the session was already ended", session=self.session_id, error=str(exc)[:300])

    def summary(self, stop_reason: str, status: str) -> SessionSummary:
        rows = self.store.list_experiments(session_id=self.session_id, limit=100_000)
        best, baseline = self.store.best(self.session_id), self.store.baseline(self.session_id)
        return SessionSummary(
            self.session_id, self.session.tag if self.session else "", stop_reason, status,
            dict(Counter(row.status for row in rows)),
            baseline.val_bpb if baseline is not None else None,
            best.val_bpb if best is not None else None,
        )

    # -- one step --------------------------------------------------------------------------------

    def step(self, lane: Lane, stop: StopCondition) -> bool:
        """Run at most one experiment on `lane`; False when this lane has nothing more to do."""
        self._beat()
        fatal = self.state.fatal
        if fatal is not None:
            stop.request_stop(fatal)
            return False
        if stop.reason() is not None:
            return False
        if self.state.quarantined(lane.gpu_uuid):
            self.board.show_lane(lane, "stopped", reason="GPU quarantined: its memory was not released after a kill")
            return False
        if self.gate is not None and lane.gpu_uuid is not None and not self.gate.may_launch(lane.gpu_uuid):
            if self.trigger == "idle":
                # A harvest lasts while the GPU is idle: once its owner is back, this lane is done.
                self.board.show_lane(lane, "stopped", reason="the harvested GPU is busy again, or was never idle")
                return False
            self.board.show_lane(lane, "paused", reason="no window for this GPU, or a foreign process uses it")
            stop.wait(1.0)  # window closed for this GPU or a foreign job holds it: look again soon
            return True
        experiment = self.work.next_experiment(lane, stop)
        if experiment is None:
            if self.state.fatal is not None or stop.reason() is not None:
                return False
            if self.state.exhausted() and not self.state.in_flight():
                return False
            stop.wait(0.2)  # another lane is measuring the baseline/noise, or a confirmation is due
            return True
        self.execution.execute(lane, experiment, stop)
        return True

    # -- housekeeping --------------------------------------------------------------------------

    def _beat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat()
