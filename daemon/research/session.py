"""The research loop: baseline, noise floor, then candidates proposed by the agent, judged and recorded.

Work is done in small steps (`ResearchSession.step(lane, stop)`), each running at most one experiment
on one lane and returning whether there may be more work; `run(stop)` drives one thread per lane and
watches the stop condition (grace period, kill), leases and the heartbeat. Tests call `step` directly.

Order of work in a session, shared by every lane: queued rows first (retries, confirmations), then
the baseline, then the noise floor (the baseline again with other seeds), then candidates. While a
lane trains, its `Proposer` already asks the agent for the next candidate (pipelining), so the GPU
does not wait for the LLM; a proposal made against a best that has changed meanwhile is rebased
(its edits re-applied to the new best) or, when they no longer apply, asked for again.

Every state change goes through the store with the expected previous state; an experiment that
fails for a reason of ours (sandbox down, database gone) is pushed back (marked `interrupted`, a
copy queued with attempt + 1) before the error is re-raised, so nothing is lost.
"""

from __future__ import annotations

import difflib
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from daemon.agents import Agent, CrashInfo, HistoryItem, Proposal, ProposalContext
from daemon.agents.edits import apply_edits, normalized_hash, validate_candidate
from daemon.config import Settings
from daemon.errors import (
    AgentError,
    AgentFatal,
    CostCapReached,
    InvalidProposal,
    TransitionError,
    WorkspaceError,
)
from daemon.logs import bind_experiment, get_logger
from daemon.research import archive, planner
from daemon.research.environment import describe_environment, visible_gpus
from daemon.research.keeper import Keeper
from daemon.research.lanes import Lane, LaunchGate
from daemon.research.ledger import build_ledger
from daemon.research.line import (
    join_research_line,
    line_seen_hashes,
    line_start,
    notebook_text,
    record_notes,
)
from daemon.research.smoke import SmokeTest, smoke_stage_runner
from daemon.statuspage import LiveState
from daemon.stop import StopCondition
from daemon.store.records import SESSION_OPEN, ExperimentRecord, SessionRecord
from daemon.workspace import Workspace
from sandbox.spec import Cancel, RunStatus

log = get_logger("autoresearch.research")

ACTIVE = ("running", "evaluating")
CRASH_STATUSES = ("crashed", "timeout", "oom", "invalid")
MAX_ATTEMPTS = 3  # an experiment pushed back this often (sandbox or DB trouble) is not retried again
CARRY_OVER_SESSIONS = 5  # how many earlier sessions are searched for work a stop cut short
MAX_INVALID_PROPOSALS = 10  # in a row: the agent is stuck (duplicates, edits that never apply)
_SUMMARY_FIELDS = {
    "training_seconds": "training_seconds", "total_seconds": "total_seconds", "peak_vram_mb": "peak_vram_mb",
    "mfu_percent": "mfu_percent", "total_tokens_M": "total_tokens_m", "num_params_M": "num_params_m",
}
_SUMMARY_INT_FIELDS = {"num_steps": "num_steps", "depth": "depth"}


class Runner(Protocol):
    """`daemon.runner.StageRunner`: train + eval of one experiment in the sandbox."""

    def run(self, experiment_id: int, attempt: int, source: str, seed: int, gpu_uuid: str | None = None,
            cancel: Cancel | None = None, on_stage: Callable[[str], None] | None = None) -> Any: ...


class Heartbeat(Protocol):
    def beat(self) -> None: ...


@dataclass(frozen=True)
class Prepared:
    """A proposal and what it was made against."""

    proposal: Proposal
    parent_id: int | None
    fix_of: int | None  # the crashed experiment this proposal tries to fix
    base_source: str = ""  # the best's source the agent saw

    @property
    def whole_file(self) -> bool:
        return any(edit.search == "" for edit in self.proposal.edits)


class Proposer:
    """Asks the agent for a lane's next proposals in a worker thread, so they are ready when the lane is."""

    def __init__(self, agent: Agent, context: Callable[[CrashInfo | None], ProposalContext], lane: str,
                 pipelined: bool = True, smoke: SmokeTest | None = None) -> None:
        self._agent = agent
        self._smoke = smoke
        self._pipelined = pipelined
        self._context = context
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"propose-{lane}")
        self._pending: deque[Future[Prepared]] = deque()
        self._lock = threading.Lock()

    def _ask(self, crash: CrashInfo | None) -> Prepared:
        ctx = self._context(crash)
        proposal = self._agent.propose(ctx)
        if self._smoke is not None:  # seconds at tiny shapes first; failures go back to the agent
            proposal = self._smoke.vet(self._agent, ctx, proposal, unified_diff)
        return Prepared(proposal, ctx.best_id, crash.experiment_id if crash is not None else None,
                        ctx.best_source)

    def prefetch(self, crash: CrashInfo | None = None) -> None:
        """Start preparing one more proposal (a crash fix when `crash` is given)."""
        with self._lock:
            self._pending.append(self._executor.submit(self._ask, crash))

    def prepare_ahead(self) -> None:
        """Pipelining: start the next proposal now, while the lane trains (no-op when not pipelined)."""
        if self._pipelined:
            self.ensure_pending()

    def ensure_pending(self) -> None:
        with self._lock:
            empty = not self._pending
        if empty:
            self.prefetch()

    def take(self, stop: StopCondition) -> Prepared | None:
        """The oldest prepared proposal (waiting for it if needed); None when a stop came first.

        Agent errors are raised here, in the lane's thread.
        """
        self.ensure_pending()
        with self._lock:
            future = self._pending[0]
        while not future.done():
            if stop.reason() is not None:
                return None
            stop.wait(0.2)
        with self._lock:
            self._pending.popleft()
        return future.result()

    def close(self) -> None:
        with self._lock:
            for future in self._pending:
                future.cancel()
            self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Running:
    lane: Lane
    cancel: Cancel
    started: float


@dataclass
class SessionSummary:
    session_id: int
    tag: str
    stop_reason: str
    status: str  # completed | interrupted | failed
    counts: dict[str, int] = field(default_factory=dict)
    baseline_val_bpb: float | None = None
    best_val_bpb: float | None = None


def outcome_fields(outcome: Any) -> dict[str, Any]:
    """Store fields of a runner outcome (metrics only from the eval stage; the summary is informational)."""
    fields: dict[str, Any] = {}
    summary = getattr(outcome, "summary", None) or {}
    for key, column in _SUMMARY_FIELDS.items():
        if isinstance(summary.get(key), int | float):
            fields[column] = float(summary[key])
    for key, column in _SUMMARY_INT_FIELDS.items():
        if isinstance(summary.get(key), int | float):
            fields[column] = int(summary[key])
    if outcome.val_bpb is not None:
        fields["val_bpb"] = float(outcome.val_bpb)
    if getattr(outcome, "eval_seconds", None) is not None:
        fields["eval_seconds"] = float(outcome.eval_seconds)
    if getattr(outcome, "probe", None):
        fields["probe"] = str(outcome.probe)
    train = getattr(outcome, "train", None)
    if train is not None:
        fields["exit_code"] = train.exit_code
        fields["oom"] = bool(train.oom_killed)
    fields["log_tail"] = str(getattr(outcome, "log_tail", "") or "")[-8000:]
    if getattr(outcome, "error", ""):
        fields["error"] = str(outcome.error)[:2000]
    return fields


def _baseline_failure(experiment_id: int, status: str, error: str, log_tail: str) -> str:
    last_lines = " | ".join(line.strip() for line in log_tail.strip().splitlines()[-2:])
    return f"the baseline train.py {status} (experiment {experiment_id}): {error.strip()[:200]}: {last_lines[-300:]}"


def unified_diff(parent: str, child: str) -> str:
    return "".join(difflib.unified_diff(parent.splitlines(keepends=True), child.splitlines(keepends=True),
                                        "a/train.py", "b/train.py"))


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
        self._lock = threading.RLock()
        self._running: dict[int, _Running] = {}
        self._keeper = Keeper(settings=settings, store=store, workspace=workspace, owner=owner,
                              session_id=lambda: self.session_id,
                              tag=lambda: self.session.tag if self.session else "session", lock=self._lock,
                              metrics=metrics)
        self._awaiting = self._keeper.awaiting  # close calls waiting for confirmation runs
        self._planned_candidates = 0  # candidates planned by this object (archive turns count them)
        self._launched_candidates = 0
        self._crash_streak = 0
        self._infra_streak = 0  # sandbox failures in a row (engine down, bad limits): not the candidate's fault
        self._quarantined: set[str] = set()  # GPUs whose memory did not come back after a killed run
        self._invalid_streak = 0
        self._agent_error_streak = 0  # plain agent failures in a row (network, server errors)
        self._fix_attempts: set[int] = set()
        self._fatal: str | None = None
        self._proposers: dict[str, Proposer] = {}
        self._program_md = ""
        self._leftovers: list[ExperimentRecord] = []
        self._line: int | None = None  # the research line (see daemon.research.line)
        smoke_runner = smoke_stage_runner(runner, settings) if settings.training.smoke else None
        self._smoke = SmokeTest(smoke_runner, store, settings.training.smoke_repair_rounds, metrics) \
            if smoke_runner is not None else None

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
                self._show_lane(lane, "idle")
        for experiment_id in orphans:
            record = self.store.get_experiment(experiment_id)
            if record is not None and record.session_id == session.id:
                self._retry_copy(record, "redoing work interrupted by a daemon crash")
        self._leftovers = self._find_leftovers() if attach_to is None else []
        self._publish_known_numbers()
        return session

    def _find_leftovers(self) -> list[ExperimentRecord]:
        """Candidates of earlier sessions that a stop cut short (or left queued) and no session has redone.

        Grouped by normalized source hash, the newest row of each idea decides: interrupted, preempted
        or still queued means its work was not done. They run in this session after its noise floor.
        """
        earlier = [s for s in self.store.list_sessions(CARRY_OVER_SESSIONS + 1) if s.id < self.session_id]
        newest: dict[str, ExperimentRecord] = {}
        for session in earlier[:CARRY_OVER_SESSIONS]:
            for row in self.store.list_experiments(session_id=session.id, limit=100_000):
                if row.kind in ("candidate", "manual") and row.source_hash and (row.source_hash not in newest or row.id > newest[row.source_hash].id):
                    newest[row.source_hash] = row
        unfinished = ("interrupted", "preempted", "queued")
        leftovers = sorted((row for row in newest.values() if row.status in unfinished and row.attempt < MAX_ATTEMPTS),
                           key=lambda row: row.id)
        if leftovers:
            log.info("earlier sessions left unfinished work; it is redone after the noise floor",
                     experiments=[row.id for row in leftovers])
        return leftovers

    def _carry_leftover(self, lane: Lane) -> ExperimentRecord | None:
        """Queue and claim the next leftover of an earlier session (attempt + 1), or None when none is left."""
        seen = self.store.seen_hashes(self.session_id)
        while self._leftovers:
            row = self._leftovers.pop(0)
            if row.source_hash in seen:
                continue  # already redone here (a resumed session)
            best = self.store.best(self.session_id)
            copy = self.store.create_experiment(
                self.session_id, row.kind, row.source, parent_id=best.id if best is not None else None,
                description=row.description, hypothesis=row.hypothesis,
                diff=unified_diff(best.source, row.source) if best is not None else row.diff,
                seed=row.seed, attempt=row.attempt + 1, source_hash=row.source_hash)
            log.info("redoing work an earlier session left unfinished", experiment_id=row.id, retry_id=copy.id,
                     previous_status=row.status)
            if row.kind == "candidate":
                self._launched_candidates += 1
            return self._claim(lane)
        return None

    def _config_snapshot(self) -> dict[str, Any]:
        # Secrets (the API key, the database URL's password) stay out of the database.
        return self.settings.public_snapshot()

    def _publish_known_numbers(self) -> None:
        if self.metrics is None:
            return
        baseline = self.store.baseline(self.session_id)
        if baseline is not None and baseline.val_bpb is not None:
            self.metrics.baseline(baseline.val_bpb)
        self._keeper.publish()
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
                    self._kill_running(RunStatus.INTERRUPTED)
                if time.monotonic() - last_renewal >= self.lease_seconds / 4:
                    self._renew_leases()
                    last_renewal = time.monotonic()
                for thread in threads:
                    thread.join(timeout=0.2)
        finally:
            if self._smoke is not None:
                self._smoke.close()
            for proposer in self._proposers.values():
                proposer.close()
            for lane in self.lanes:
                self._show_lane(lane, "stopped", reason=stop.reason() or "")
        reason = stop.reason() or ("experiment count reached" if self._exhausted() else "no more work")
        with self._lock:
            unconfirmed = list(self._awaiting)
        for candidate_id in unconfirmed:
            try:
                self._keeper.interrupt(candidate_id, f"the session ended before its confirmation run ({reason})")
            except Exception as exc:  # the lease expires and start-up reconciliation finds it
                log.error("could not interrupt an unconfirmed candidate", experiment_id=candidate_id,
                          error=str(exc)[:300])
        status = "failed" if (errors or self._fatal) else ("interrupted" if stop.signalled() else "completed")
        summary = self.summary(self._fatal or reason, status)
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
        if self._fatal is not None:
            stop.request_stop(self._fatal)
            return False
        if stop.reason() is not None:
            return False
        if lane.gpu_uuid in self._quarantined:
            self._show_lane(lane, "stopped", reason="GPU quarantined: its memory was not released after a kill")
            return False
        if self.gate is not None and lane.gpu_uuid is not None and not self.gate.may_launch(lane.gpu_uuid):
            if self.trigger == "idle":
                # A harvest lasts while the GPU is idle: once its owner is back, this lane is done.
                self._show_lane(lane, "stopped", reason="the harvested GPU is busy again, or was never idle")
                return False
            self._show_lane(lane, "paused", reason="no window for this GPU, or a foreign process uses it")
            stop.wait(1.0)  # window closed for this GPU or a foreign job holds it: look again soon
            return True
        experiment = self._next_experiment(lane, stop)
        if experiment is None:
            if self._fatal is not None or stop.reason() is not None:
                return False
            if self._exhausted() and not self._work_in_flight():
                return False
            stop.wait(0.2)  # another lane is measuring the baseline/noise, or a confirmation is due
            return True
        self._execute(lane, experiment, stop)
        return True

    def _exhausted(self) -> bool:
        return self.max_experiments is not None and self._launched_candidates >= self.max_experiments

    def _work_in_flight(self) -> bool:
        with self._lock:
            return bool(self._running) or bool(self._awaiting)

    def _claim(self, lane: Lane) -> ExperimentRecord | None:
        record: ExperimentRecord | None = self.store.claim_next(
            self.session_id, self.owner, lane.name, lane.gpu_uuid, self.lease_seconds)
        if record is not None:
            with self._lock:
                self._running[record.id] = _Running(lane, Cancel(), time.monotonic())
        return record

    def _next_experiment(self, lane: Lane, stop: StopCondition) -> ExperimentRecord | None:
        """Queued work first, then what the planner says (`daemon.research.planner`)."""
        with self._lock:
            claimed = self._claim(lane)
            if claimed is not None:
                return claimed
            rows = self.store.list_experiments(session_id=self.session_id, limit=100_000)
            plan = planner.next_move(rows, self.store.best(self.session_id), self.settings.judge)
            if plan.move is planner.Move.WAIT:
                return None
            if plan.move is planner.Move.BASELINE_FAILED and plan.failed is not None:
                failed = plan.failed
                self._fatal = _baseline_failure(failed.id, failed.status, getattr(failed, "error", ""),
                                                getattr(failed, "log_tail", ""))
                return None
            if plan.move is planner.Move.BASELINE:
                start = line_start(self.store, self.line_id, self.session_id)
                source = start.source if start is not None else self.workspace.baseline_source()
                self._proposer(lane).prepare_ahead()
                self.store.create_experiment(self.session_id, "baseline", source, seed=0, description="baseline" + (
                                                 f" (the line's best #{start.id})" if start is not None else ""),
                                             source_hash=normalized_hash(source))
                return self._claim(lane)
            if plan.move is planner.Move.NOISE:
                self._proposer(lane).prepare_ahead()  # the first candidate is prepared meanwhile
                baseline = self._baseline_row(rows)
                self.store.create_experiment(self.session_id, "noise", baseline.source,
                                             description=f"noise floor: baseline with seed {plan.seed}",
                                             seed=plan.seed, source_hash=baseline.source_hash)
                return self._claim(lane)
            if self._exhausted():
                return None  # `once -n N`: N candidates, no re-measure after the last one
            if plan.move is planner.Move.REMEASURE:
                best = self.store.best(self.session_id)
                if best is not None:
                    self.store.create_experiment(
                        self.session_id, "remeasure", best.source, parent_id=best.id,
                        description=f"re-measure the best #{best.id} (seed {plan.seed})", seed=plan.seed,
                        source_hash=best.source_hash)
                    return self._claim(lane)
            carried = self._carry_leftover(lane)
            if carried is not None:
                return carried
            near_miss = self._near_miss_move(lane)
            if near_miss is not None:
                return near_miss
        return self._plan_candidate(lane, stop)

    def _baseline_row(self, rows: list[ExperimentRecord]) -> ExperimentRecord:
        return next(r for r in rows if r.kind == "baseline" and r.status == "kept")

    def _near_miss_move(self, lane: Lane) -> ExperimentRecord | None:
        """Under `search = archive`, every few candidates: a near-miss re-tried on the current best (no agent call)."""
        if not planner.archive_turn(self._planned_candidates, self.settings.judge):
            return None
        self._planned_candidates += 1  # this turn is used, whether or not the archive has a move
        best = self.store.best(self.session_id)
        if best is None:
            return None
        rows = self.store.list_experiments(session_id=self.session_id, limit=100_000)
        picked = archive.pick_near_miss(rows, best, best.source, self.store.seen_hashes(self.session_id))
        if picked is None:
            return None
        miss, source = picked
        self.store.create_experiment(
            self.session_id, "candidate", source, parent_id=best.id, parent2_id=miss.experiment_id,
            description=f"near-miss #{miss.experiment_id} on the best #{best.id}: {miss.description}"[:500],
            hypothesis=f"#{miss.experiment_id} looked better (t = {miss.t:.2f}) but did not prove it; "
                       "re-tried on the current best", diff=unified_diff(best.source, source), seed=0,
            source_hash=normalized_hash(source))
        self._launched_candidates += 1
        log.info("near-miss move", lane=lane.name, near_miss=miss.experiment_id, best=best.id)
        return self._claim(lane)

    def _plan_candidate(self, lane: Lane, stop: StopCondition) -> ExperimentRecord | None:
        prepared = self._take_proposal(lane, stop)
        if prepared is None:
            return None
        proposal, source, parent, source_hash = prepared
        with self._lock:
            if self._exhausted():
                return None
            if source_hash in self.store.seen_hashes(self.session_id):
                # Another lane queued the same source while this one waited for the lock.
                self._count_invalid("duplicate of an experiment queued meanwhile")
                return None
            record = self.store.create_experiment(
                self.session_id, "candidate", source, parent_id=parent.id, description=proposal.proposal.description,
                hypothesis=proposal.proposal.hypothesis, diff=unified_diff(parent.source, source), seed=0,
                source_hash=source_hash)
            record_notes(self.store, self.line_id, self.session_id, record.id, proposal.proposal.notes)
            if proposal.fix_of is not None:
                self._fix_attempts.add(record.id)
            self._launched_candidates += 1
            self._planned_candidates += 1
            return self._claim(lane)

    def _take_proposal(self, lane: Lane,
                       stop: StopCondition) -> tuple[Prepared, str, ExperimentRecord, str] | None:
        """The lane's next proposal, rebased onto the current best when that changed; None on stop.

        Returns (proposal, candidate source, parent, normalized source hash).
        """
        proposer = self._proposer(lane)
        backoff = max(self.settings.agent.retry_backoff_s, 0.01)
        while stop.reason() is None and self._fatal is None:
            try:
                prepared = proposer.take(stop)
            except CostCapReached as exc:
                stop.request_stop(f"cost cap reached: {exc}")
                return None
            except AgentFatal as exc:
                self._fatal = f"the agent cannot continue: {exc}" + (f" ({exc.hint})" if exc.hint else "")
                return None
            except InvalidProposal as exc:
                self._count_invalid(str(exc))
                continue
            except AgentError as exc:
                self._agent_error_streak += 1
                if self._agent_error_streak >= MAX_INVALID_PROPOSALS:
                    self._fatal = (f"the agent failed {self._agent_error_streak} times in a row: {exc}"
                                   + (f" ({exc.hint})" if exc.hint else ""))
                    return None
                log.warning("agent failed; retrying after a pause", lane=lane.name, error=str(exc),
                            retry_in_s=backoff, in_a_row=self._agent_error_streak)
                stop.wait(backoff)
                backoff = min(backoff * 2, max(self.settings.agent.retry_wait_max_s, 0.01))
                continue
            if prepared is None:
                return None
            self._agent_error_streak = 0
            proposer.prepare_ahead()  # the next proposal is prepared while this one trains
            best = self.store.best(self.session_id)
            if best is None:
                raise RuntimeError("a candidate was planned before the baseline was kept")
            source = prepared.proposal.source
            if prepared.whole_file and prepared.base_source != best.source:
                # Re-applying a whole file would silently undo what the new best changed.
                self._count_invalid(f"whole-file proposal made against an older best (#{prepared.parent_id}); "
                                    "asking again")
                continue
            try:
                if prepared.parent_id != best.id:
                    source = apply_edits(best.source, prepared.proposal.edits)
                    log.info("proposal rebased onto the new best", lane=lane.name, best=best.id,
                             made_against=prepared.parent_id)
                source_hash = validate_candidate(source, self.store.seen_hashes(self.session_id))
            except InvalidProposal as exc:
                self._count_invalid(f"proposal refused, asking again: {exc}")
                continue
            self._invalid_streak = 0
            return prepared, source, best, source_hash
        return None

    def _count_invalid(self, why: str) -> None:
        self._invalid_streak += 1
        log.warning("proposal not usable", reason=why[:300], in_a_row=self._invalid_streak)
        if self._invalid_streak >= MAX_INVALID_PROPOSALS:
            self._fatal = (f"the agent produced {self._invalid_streak} unusable proposals in a row "
                           f"(last: {why[:200]})")

    def _proposer(self, lane: Lane) -> Proposer:
        with self._lock:
            if lane.name not in self._proposers:
                self._proposers[lane.name] = Proposer(self.agent, self._context, lane.name, self.pipelined,
                                                      self._smoke)
            return self._proposers[lane.name]

    def _context(self, crash: CrashInfo | None) -> ProposalContext:
        best = self.store.best(self.session_id)
        baseline = self.store.baseline(self.session_id)
        start = line_start(self.store, self.line_id, self.session_id) if best is None else None
        best_source = best.source if best is not None else (
            start.source if start is not None else self.workspace.baseline_source())
        best_val = best.val_bpb if best is not None else None
        rows = self.store.history(self.session_id, self.settings.agent.history_size)
        known = {row.id: row for row in rows}
        history = tuple(HistoryItem(r.id, r.status, r.val_bpb, self._delta(r, known), r.description)
                        for r in rows)
        return ProposalContext(
            session_id=self.session_id, program_md=self._program_md, best_source=best_source,
            best_id=best.id if best is not None else None, best_val_bpb=best_val,
            baseline_val_bpb=baseline.val_bpb if baseline is not None else None, history=history,
            seen_hashes=line_seen_hashes(self.store, self.line_id), crash=crash,
            cost_since=self.cost_since,
            ledger=build_ledger(self.store, self.store.line_sessions(self.line_id), self.session_id,
                                self.settings.judge),
            notebook=notebook_text(self.store, self.line_id),
            environment=describe_environment(self.settings, self.lanes, baseline, visible_gpus(self.runner)),
        )

    def _delta(self, row: ExperimentRecord, known: dict[int, ExperimentRecord]) -> float | None:
        """val_bpb minus the best's at the time (the row's parent); None when that is unknown."""
        if row.val_bpb is None:
            return None
        parent = self._row(row.parent_id, known)
        if row.kind == "confirm" and parent is not None:
            parent = self._row(parent.parent_id, known)  # a confirmation repeats its candidate
        if parent is None or parent.val_bpb is None:
            return None
        return float(row.val_bpb - parent.val_bpb)

    def _row(self, experiment_id: int | None, known: dict[int, ExperimentRecord]) -> ExperimentRecord | None:
        if experiment_id is None:
            return None
        if experiment_id not in known:
            found = self.store.get_experiment(experiment_id)
            if found is None:
                return None
            known[experiment_id] = found
        return known[experiment_id]

    # -- running one experiment ----------------------------------------------------------------

    def _execute(self, lane: Lane, experiment: ExperimentRecord, stop: StopCondition) -> None:
        with self._lock:
            running = self._running[experiment.id]
        if stop.kill_due():
            running.cancel.set(RunStatus.INTERRUPTED)
        if self.gate is not None and lane.gpu_uuid is not None:
            self.gate.attach_run(lane.gpu_uuid, running.cancel)
        if self.metrics is not None:
            self.metrics.lane_busy(lane.name, True)
        self._show_lane(lane, "running", experiment)
        with bind_experiment(experiment.id, lane=lane.name, kind=experiment.kind):
            log.info("experiment started", attempt=experiment.attempt, seed=experiment.seed,
                     description=experiment.description[:120])
            try:
                outcome = self.runner.run(
                    experiment.id, experiment.attempt, experiment.source, experiment.seed,
                    gpu_uuid=lane.gpu_uuid, cancel=running.cancel,
                    on_stage=lambda stage: self._on_stage(lane, experiment, stage))
                self._finish(lane, experiment, outcome, running)
            except TransitionError as exc:
                if not self._lease_lost(experiment.id):
                    self._push_back(experiment, f"{type(exc).__name__}: {exc}")
                    raise
                # Our lease expired and another daemon took the experiment over: its run stands, ours is dropped.
                log.warning("lease lost; leaving the experiment to its new owner", error=str(exc)[:300])
                with self._lock:
                    self._awaiting.pop(experiment.id, None)
            except BaseException as exc:
                self._push_back(experiment, f"{type(exc).__name__}: {exc}")
                raise
            finally:
                if self.gate is not None and lane.gpu_uuid is not None:
                    self.gate.detach_run(lane.gpu_uuid)
                if self.metrics is not None:
                    self.metrics.lane_busy(lane.name, False)
                self._show_lane(lane, "idle")
                with self._lock:
                    self._running.pop(experiment.id, None)

    def _show_lane(self, lane: Lane, state: str, experiment: ExperimentRecord | None = None,
                   reason: str = "") -> None:
        """Keep the status page's view of the lane current."""
        if self.live is not None:
            self.live.set_lane(lane.name, lane.gpu_uuid, state,
                               experiment_id=experiment.id if experiment is not None else None,
                               description=experiment.description if experiment is not None else "", reason=reason)

    def _transition(self, experiment_id: int, expected: str | tuple[str, ...], new: str,
                    **fields: Any) -> ExperimentRecord:
        """A state change of one of our leased rows: refused (TransitionError) once another owner took it over."""
        record: ExperimentRecord = self.store.transition(experiment_id, expected, new, owner=self.owner, **fields)
        return record

    def _lease_lost(self, experiment_id: int) -> bool:
        current = self.store.get_experiment(experiment_id)
        return current is not None and current.lease_owner != self.owner

    def _on_stage(self, lane: Lane, experiment: ExperimentRecord, stage: str) -> None:
        if stage == "eval":
            self._transition(experiment.id, "running", "evaluating")
            self._show_lane(lane, "evaluating", experiment)

    def _finish(self, lane: Lane, experiment: ExperimentRecord, outcome: Any, running: _Running) -> None:
        fields = outcome_fields(outcome)
        status = str(getattr(outcome.status, "value", outcome.status))
        if self.metrics is not None:
            self._observe_stages(outcome)
            if lane.gpu_uuid is not None:
                # The runner checks after each killed run whether the GPU's memory came back.
                self.metrics.gpu_quarantined(lane.gpu_uuid, bool(getattr(outcome, "gpu_quarantined", False)))
        if lane.gpu_uuid is not None and getattr(outcome, "gpu_quarantined", False):
            self._quarantined.add(lane.gpu_uuid)
            log.error("GPU quarantined: no more experiments on it this session", lane=lane.name, gpu=lane.gpu_uuid)
        self._count_infra_error(status, str(fields.get("error") or f"sandbox run {status}"))
        if status == "ok" and outcome.val_bpb is not None:
            self._ensure_evaluating(experiment.id)
            final = self._judge(experiment, float(outcome.val_bpb), fields)
            self._crash_streak = 0
        elif status in ("interrupted", "preempted", "infra_error"):
            final = "preempted" if status == "preempted" else "interrupted"
            fields.setdefault("error", f"sandbox run {status}")
            self._transition(experiment.id, ACTIVE, final, **fields)
            killed_by_stop = status == "interrupted" and running.cancel.reason is RunStatus.INTERRUPTED
            if killed_by_stop:
                # The session is ending: the next session redoes it (see `_find_leftovers`).
                self._keeper.interrupt(experiment.parent_id, "its confirmation run was cut short by a stop")
            else:
                self._retry_copy(experiment, f"sandbox run {status}")
            self._keeper.abandon(experiment, f"its confirmation run was {final}")
        else:
            final = status if status in CRASH_STATUSES else "invalid"
            self._transition(experiment.id, ACTIVE, final, **fields)
            self._after_crash(lane, experiment, final, fields)
        with bind_experiment(experiment.id, lane=lane.name, kind=experiment.kind):
            log.info("experiment finished", status=final, val_bpb=fields.get("val_bpb"),
                     seconds=round(time.monotonic() - running.started, 1))
        self.workspace.write_results(self.store.results_tsv(self.session_id))
        if self.metrics is not None:
            self.metrics.experiment_finished(experiment.kind, final, lane.name, fields.get("val_bpb"),
                                             time.monotonic() - running.started)
            self.metrics.consecutive_crashes(self._crash_streak)

    def _count_infra_error(self, status: str, error: str) -> None:
        """A sandbox that keeps failing is a broken set-up: stop the session instead of retrying forever."""
        if status != "infra_error":
            self._infra_streak = 0
            return
        self._infra_streak += 1
        if self._infra_streak >= MAX_ATTEMPTS:
            self._fatal = (f"the sandbox failed {self._infra_streak} runs in a row: {error[:300]} "
                           "(check `autoresearch doctor` and the [sandbox] settings)")

    def _observe_stages(self, outcome: Any) -> None:
        overhead = getattr(outcome, "overhead_seconds", None) or {}
        for stage, result in (("train", outcome.train), ("eval", outcome.eval)):
            if result is not None:
                self.metrics.stage_finished(stage, result.wall_seconds, float(overhead.get(stage, 0.0)))

    def _ensure_evaluating(self, experiment_id: int) -> None:
        current = self.store.get_experiment(experiment_id)
        if current is not None and current.status == "running":
            self._transition(experiment_id, "running", "evaluating")

    def _judge(self, experiment: ExperimentRecord, val_bpb: float, fields: dict[str, Any]) -> str:
        """Record a measured experiment (`daemon.research.keeper`); its final status, or `evaluating`."""
        return self._keeper.record(experiment, val_bpb, fields)

    def _after_crash(self, lane: Lane, experiment: ExperimentRecord, status: str, fields: dict[str, Any]) -> None:
        if experiment.kind == "baseline":
            self._fatal = _baseline_failure(experiment.id, status, str(fields.get("error", "")),
                                            str(fields.get("log_tail", "")))
            return
        if experiment.kind in ("noise", "remeasure"):
            return
        if experiment.kind == "confirm":
            self._keeper.abandon(experiment, f"its confirmation run {status}")
            return
        self._crash_streak += 1
        limit = self.settings.judge.max_consecutive_crashes
        if self._crash_streak >= limit:
            log.error("too many consecutive crashes; stopping the session", crashes=self._crash_streak)
            self._fatal = f"{self._crash_streak} experiments crashed in a row (judge.max_consecutive_crashes)"
            return
        if experiment.kind == "candidate" and experiment.id not in self._fix_attempts:
            # One fix attempt: the agent sees the failure (fenced, truncated) and may repair the idea.
            self._proposer(lane).prefetch(CrashInfo(experiment.id, experiment.description, status,
                                                    str(fields.get("log_tail", ""))[-4000:], experiment.diff))

    def _push_back(self, experiment: ExperimentRecord, why: str) -> None:
        """Before an error propagates: mark the experiment interrupted and queue it again."""
        try:
            current = self.store.get_experiment(experiment.id)
            if current is not None and current.status in ACTIVE:
                self._transition(experiment.id, ACTIVE, "interrupted", error=why[:2000])
                self._retry_copy(experiment, why)
        except Exception as exc:  # the store may be the reason; lease expiry requeues it on the next start
            log.error("could not push the experiment back", experiment_id=experiment.id, error=str(exc)[:300])

    def _retry_copy(self, experiment: ExperimentRecord, why: str) -> ExperimentRecord | None:
        if experiment.kind == "confirm" or experiment.attempt >= MAX_ATTEMPTS:
            return None
        copy: ExperimentRecord = self.store.create_experiment(
            experiment.session_id, experiment.kind, experiment.source, parent_id=experiment.parent_id,
            description=experiment.description, hypothesis=experiment.hypothesis, diff=experiment.diff,
            seed=experiment.seed, attempt=experiment.attempt + 1, source_hash=experiment.source_hash)
        log.info("experiment queued again", experiment_id=experiment.id, retry_id=copy.id, why=why[:200])
        return copy

    # -- housekeeping --------------------------------------------------------------------------

    def _beat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat()

    def _kill_running(self, reason: RunStatus) -> None:
        with self._lock:
            for running in self._running.values():
                if running.cancel.reason is None:
                    log.warning("killing the running experiment", lane=running.lane.name, reason=reason.value)
                    running.cancel.set(reason)

    def _renew_leases(self) -> None:
        with self._lock:
            held = [*self._running, *self._awaiting]
        for experiment_id in held:
            try:
                self.store.renew_lease(experiment_id, self.owner, self.lease_seconds)
            except Exception as exc:  # a DB hiccup: the next renewal tries again well before expiry
                log.warning("lease renewal failed", experiment_id=experiment_id, error=str(exc)[:200])
                self._stop_if_taken_over(experiment_id)

    def _stop_if_taken_over(self, experiment_id: int) -> None:
        """Another daemon owns this experiment now (our lease expired): stop running our copy of it."""
        try:
            lost = self._lease_lost(experiment_id)
        except Exception:  # the database is still away; the next renewal looks again
            return
        if lost:
            with self._lock:
                running = self._running.get(experiment_id)
            if running is not None and running.cancel.reason is None:
                log.warning("lease taken over by another owner; stopping our run", experiment_id=experiment_id)
                running.cancel.set(RunStatus.INTERRUPTED)
