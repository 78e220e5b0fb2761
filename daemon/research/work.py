"""What a free lane runs next: the planner's moves turned into queued experiments.

`WorkSource` belongs to one `ResearchSession` and works on its shared `state.SessionState` (lock, counters),
claiming what it queues through the session's `board.ExperimentBoard`:
- `next_experiment`: queued rows first (retries, confirmations), then what `daemon.research.planner`
  says: the baseline, noise runs, a re-measure of the best, or a candidate from below;
- `plan_candidate`: the lane's next proposal (prepared ahead by a `proposer.Proposer`), rebased onto the
  current best when that changed, validated, deduplicated and queued; agent failures and unusable
  proposals in a row end the session;
- `near_miss_move`: under `judge.search = archive`, every few candidates a near-miss re-tried on the best
  (`daemon.research.archive`), with both parents recorded;
- `find_leftovers` / `carry_leftover`: candidates of earlier sessions that a stop cut short, redone here;
- `proposer`: the lane's `proposer.Proposer`, asking the agent with what `briefing.Briefing` shows it; a
  proposal that repeats a tried idea is refused (`briefing.RepeatGuard`) before it is queued.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from daemon.agents import Agent
from daemon.agents.combine import candidate_source
from daemon.agents.edits import apply_edits, normalized_hash, validate_candidate
from daemon.config import Settings
from daemon.errors import (
    AgentError,
    AgentFatal,
    CostCapReached,
    InvalidProposal,
)
from daemon.ops.logs import get_logger
from daemon.research import archive, planner
from daemon.research.archive import unified_diff
from daemon.research.board import ExperimentBoard
from daemon.research.briefing import Briefing, RepeatGuard
from daemon.research.lanes import Lane
from daemon.research.line import line_start, record_notes
from daemon.research.proposer import Prepared, Proposer
from daemon.research.running import MAX_ATTEMPTS, baseline_failure
from daemon.research.smoke import SmokeTest
from daemon.research.state import SessionState
from daemon.research.stop import StopCondition
from daemon.research.workspace import Workspace
from daemon.store.records import ExperimentRecord

log = get_logger("autoresearch.research")

CARRY_OVER_SESSIONS = 5  # how many earlier sessions are searched for work a stop cut short
MAX_INVALID_PROPOSALS = 10  # in a row: the agent is stuck (duplicates, edits that never apply)


class WorkSource:
    """What the lanes of one session run next (see the module docstring)."""

    def __init__(self, *, settings: Settings, store: Any, workspace: Workspace, state: SessionState,
                 board: ExperimentBoard, briefing: Briefing, repeats: RepeatGuard, agent: Agent,
                 session_id: Callable[[], int], line_id: Callable[[], int], pipelined: bool = True,
                 smoke: SmokeTest | None = None) -> None:
        self.settings = settings
        self.store = store
        self.workspace = workspace
        self.state = state
        self.board = board
        self.briefing = briefing
        self.repeats = repeats
        self.agent = agent
        self.session_id = session_id
        self.line_id = line_id
        self.pipelined = pipelined
        self.smoke = smoke
        self._proposers: dict[str, Proposer] = {}
        self._leftovers: list[ExperimentRecord] = []

    def open(self, *, carry_over: bool) -> None:
        """At the session's start: look for work earlier sessions left unfinished (unless `carry_over` is off)."""
        self._leftovers = self.find_leftovers() if carry_over else []

    def close(self) -> None:
        """At the session's end: stop the lanes' proposers."""
        for proposer in self._proposers.values():
            proposer.close()

    def next_experiment(self, lane: Lane, stop: StopCondition) -> ExperimentRecord | None:
        """Queued work first, then what the planner says (`daemon.research.planner`)."""
        with self.state.lock:
            claimed = self.board.claim(lane)
            if claimed is not None:
                return claimed
            rows = self.store.list_experiments(session_id=self.session_id(), limit=100_000)
            plan = planner.next_move(rows, self.store.best(self.session_id()), self.settings.judge)
            if plan.move is planner.Move.WAIT:
                return None
            if plan.move is planner.Move.BASELINE_FAILED and plan.failed is not None:
                failed = plan.failed
                self.state.fail(baseline_failure(failed.id, failed.status, getattr(failed, "error", ""),
                                                 getattr(failed, "log_tail", "")))
                return None
            if plan.move is planner.Move.BASELINE:
                start = line_start(self.store, self.line_id(), self.session_id())
                source = start.source if start is not None else self.workspace.baseline_source()
                self.proposer(lane).prepare_ahead()
                self.store.create_experiment(
                    self.session_id(), "baseline", source, seed=0,
                    description="baseline" + (f" (the line's best #{start.id})" if start is not None else ""),
                    source_hash=normalized_hash(source))
                return self.board.claim(lane)
            if plan.move is planner.Move.NOISE:
                self.proposer(lane).prepare_ahead()  # the first candidate is prepared meanwhile
                baseline = self.baseline_row(rows)
                self.store.create_experiment(self.session_id(), "noise", baseline.source,
                                             description=f"noise floor: baseline with seed {plan.seed}",
                                             seed=plan.seed, source_hash=baseline.source_hash)
                return self.board.claim(lane)
            if self.state.exhausted():
                return None  # `once -n N`: N candidates, no re-measure after the last one
            if plan.move is planner.Move.REMEASURE:
                best = self.store.best(self.session_id())
                if best is not None:
                    self.store.create_experiment(
                        self.session_id(), "remeasure", best.source, parent_id=best.id,
                        description=f"re-measure the best #{best.id} (seed {plan.seed})", seed=plan.seed,
                        source_hash=best.source_hash)
                    return self.board.claim(lane)
            carried = self.carry_leftover(lane)
            if carried is not None:
                return carried
            near_miss = self.near_miss_move(lane)
            if near_miss is not None:
                return near_miss
        return self.plan_candidate(lane, stop)

    def baseline_row(self, rows: list[ExperimentRecord]) -> ExperimentRecord:
        return next(r for r in rows if r.kind == "baseline" and r.status == "kept")

    def find_leftovers(self) -> list[ExperimentRecord]:
        """Candidates of earlier sessions that a stop cut short (or left queued) and no session has redone.

        Grouped by normalized source hash, the newest row of each idea decides: interrupted, preempted
        or still queued means its work was not done. They run in this session after its noise floor.
        """
        earlier = [s for s in self.store.list_sessions(CARRY_OVER_SESSIONS + 1) if s.id < self.session_id()]
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

    def carry_leftover(self, lane: Lane) -> ExperimentRecord | None:
        """Queue and claim the next leftover of an earlier session (attempt + 1), or None when none is left."""
        seen = self.store.seen_hashes(self.session_id())
        while self._leftovers:
            row = self._leftovers.pop(0)
            if row.source_hash in seen:
                continue  # already redone here (a resumed session)
            best = self.store.best(self.session_id())
            copy = self.store.create_experiment(
                self.session_id(), row.kind, row.source, parent_id=best.id if best is not None else None,
                description=row.description, hypothesis=row.hypothesis,
                diff=unified_diff(best.source, row.source) if best is not None else row.diff,
                seed=row.seed, attempt=row.attempt + 1, source_hash=row.source_hash)
            log.info("redoing work an earlier session left unfinished", experiment_id=row.id, retry_id=copy.id,
                     previous_status=row.status)
            if row.kind == "candidate":
                self.state.candidate_launched()
            return self.board.claim(lane)
        return None

    def near_miss_move(self, lane: Lane) -> ExperimentRecord | None:
        """Under `search = archive`, every few candidates: a near-miss re-tried on the current best (no agent call)."""
        if not planner.archive_turn(self.state.planned_candidates, self.settings.judge):
            return None
        self.state.candidate_planned()  # this turn is used, whether or not the archive has a move
        best = self.store.best(self.session_id())
        if best is None:
            return None
        rows = self.store.list_experiments(session_id=self.session_id(), limit=100_000)
        picked = archive.pick_near_miss(rows, best, best.source, self.store.seen_hashes(self.session_id()))
        if picked is None:
            return None
        miss, source = picked
        self.store.create_experiment(
            self.session_id(), "candidate", source, parent_id=best.id, parent2_id=miss.experiment_id,
            description=f"near-miss #{miss.experiment_id} on the best #{best.id}: {miss.description}"[:500],
            hypothesis=f"#{miss.experiment_id} looked better (t = {miss.t:.2f}) but did not prove it; "
                       "re-tried on the current best", diff=unified_diff(best.source, source),
            seed=planner.first_seed(rows, best, self.settings.judge),
            source_hash=normalized_hash(source))
        self.state.candidate_launched()
        log.info("near-miss move", lane=lane.name, near_miss=miss.experiment_id, best=best.id)
        return self.board.claim(lane)

    def plan_candidate(self, lane: Lane, stop: StopCondition) -> ExperimentRecord | None:
        prepared = self.take_proposal(lane, stop)
        if prepared is None:
            return None
        proposal, source, parent, source_hash = prepared
        with self.state.lock:
            if self.state.exhausted():
                return None
            if source_hash in self.store.seen_hashes(self.session_id()):
                # Another lane queued the same source while this one waited for the lock.
                self.count_invalid("duplicate of an experiment queued meanwhile")
                return None
            record = self.store.create_experiment(
                self.session_id(), "candidate", source, parent_id=parent.id,
                parent2_id=proposal.proposal.combine_with, description=proposal.proposal.description,
                hypothesis=proposal.proposal.hypothesis, diff=unified_diff(parent.source, source),
                seed=planner.first_seed(self.store.list_experiments(session_id=self.session_id(), limit=100_000),
                                        self.store.best(self.session_id()), self.settings.judge),
                source_hash=source_hash)
            record_notes(self.store, self.line_id(), self.session_id(), record.id, proposal.proposal.notes)
            if proposal.fix_of is not None:
                self.state.mark_fix(record.id)
            self.state.candidate_launched()
            self.state.candidate_planned()
            return self.board.claim(lane)

    def take_proposal(self, lane: Lane,
                       stop: StopCondition) -> tuple[Prepared, str, ExperimentRecord, str] | None:
        """The lane's next proposal, rebased onto the current best when that changed; None on stop.

        A combine (`proposal.combine_with`) is checked against the line's archive and rebuilt here: the
        current best, the proposal's edits, then the near-miss's change.
        Returns (proposal, candidate source, parent, normalized source hash).
        """
        proposer = self.proposer(lane)
        backoff = max(self.settings.agent.retry_backoff_s, 0.01)
        while stop.reason() is None and self.state.fatal is None:
            try:
                prepared = proposer.take(stop)
            except CostCapReached as exc:
                stop.request_stop(f"cost cap reached: {exc}")
                return None
            except AgentFatal as exc:
                self.state.fail(f"the agent cannot continue: {exc}" + (f" ({exc.hint})" if exc.hint else ""))
                return None
            except InvalidProposal as exc:
                self.count_invalid(str(exc))
                continue
            except AgentError as exc:
                failures = self.state.agent_failed()
                if failures >= MAX_INVALID_PROPOSALS:
                    self.state.fail(f"the agent failed {failures} times in a row: {exc}"
                                    + (f" ({exc.hint})" if exc.hint else ""))
                    return None
                log.warning("agent failed; retrying after a pause", lane=lane.name, error=str(exc),
                            retry_in_s=backoff, in_a_row=failures)
                stop.wait(backoff)
                backoff = min(backoff * 2, max(self.settings.agent.retry_wait_max_s, 0.01))
                continue
            if prepared is None:
                return None
            self.state.agent_answered()
            proposer.prepare_ahead()  # the next proposal is prepared while this one trains
            best = self.store.best(self.session_id())
            if best is None:
                raise RuntimeError("a candidate was planned before the baseline was kept")
            source = prepared.proposal.source
            if prepared.whole_file and prepared.base_source != best.source:
                # Re-applying a whole file would silently undo what the new best changed.
                self.count_invalid(f"whole-file proposal made against an older best (#{prepared.parent_id}); "
                                    "asking again")
                continue
            try:
                if prepared.proposal.combine_with is not None:
                    source = self.combined(best, prepared)
                elif prepared.parent_id != best.id:
                    source = apply_edits(best.source, prepared.proposal.edits)
                    log.info("proposal rebased onto the new best", lane=lane.name, best=best.id,
                             made_against=prepared.parent_id)
                source_hash = validate_candidate(source, self.store.seen_hashes(self.session_id()))
                self.repeats.refuse_repeat(best.source, source, prepared.proposal.description)
            except InvalidProposal as exc:
                self.count_invalid(f"proposal refused, asking again: {exc}")
                continue
            self.state.proposal_usable()
            return prepared, source, best, source_hash
        return None

    def combined(self, best: ExperimentRecord, prepared: Prepared) -> str:
        """The source of a combine: the best, the edits, the archived near-miss's change (or `InvalidProposal`)."""
        assert prepared.proposal.combine_with is not None
        rows = [row for sid in self.store.line_sessions(self.line_id())
                for row in self.store.list_experiments(session_id=sid, limit=100_000)]
        miss = archive.archived_near_miss(rows, prepared.proposal.combine_with)
        return candidate_source(best.source, prepared.proposal.edits, miss.diff)

    def count_invalid(self, why: str) -> None:
        unusable = self.state.proposal_unusable()
        log.warning("proposal not usable", reason=why[:300], in_a_row=unusable)
        if unusable >= MAX_INVALID_PROPOSALS:
            self.state.fail(f"the agent produced {unusable} unusable proposals in a row (last: {why[:200]})")

    def proposer(self, lane: Lane) -> Proposer:
        with self.state.lock:
            if lane.name not in self._proposers:
                self._proposers[lane.name] = Proposer(self.agent, self.briefing.context, lane.name, self.pipelined,
                                                      self.smoke)
            return self._proposers[lane.name]
