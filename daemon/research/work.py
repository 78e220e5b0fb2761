"""What a free lane runs next: the planner's moves turned into queued experiments.

`WorkSource` belongs to one `ResearchSession` and works on its state (store, lock, counters):
- `next_experiment`: queued rows first (retries, confirmations), then what `daemon.research.planner`
  says: the baseline, noise runs, a re-measure of the best, or a candidate from below;
- `plan_candidate`: the lane's next proposal (prepared ahead by a `proposer.Proposer`), rebased onto the
  current best when that changed, validated, deduplicated and queued; agent failures and unusable
  proposals in a row end the session;
- `near_miss_move`: under `judge.search = archive`, every few candidates a near-miss re-tried on the best
  (`daemon.research.archive`), with both parents recorded;
- `find_leftovers` / `carry_leftover`: candidates of earlier sessions that a stop cut short, redone here;
- `context`: what the agent is shown (the `ProposalContext`: ledger, idea memory, notebook, environment,
  history, the line's fence nonce); a proposal that repeats a tried idea (`daemon.research.ideas`) is
  refused before it is queued and shown to the agent at its next proposal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.agents import CrashInfo, HistoryItem, ProposalContext
from daemon.agents.combine import candidate_source
from daemon.agents.edits import apply_edits, normalized_hash, validate_candidate
from daemon.errors import (
    AgentError,
    AgentFatal,
    CostCapReached,
    InvalidProposal,
)
from daemon.ops.logs import get_logger
from daemon.research import archive, measurements, planner
from daemon.research.archive import unified_diff
from daemon.research.environment import describe_environment, visible_gpus
from daemon.research.ideas import idea_memory
from daemon.research.lanes import Lane
from daemon.research.ledger import ledger_from_rows, line_rows
from daemon.research.line import (
    line_seen_hashes,
    line_start,
    notebook_text,
    record_notes,
)
from daemon.research.proposer import Prepared, Proposer
from daemon.research.retest import keep_notes
from daemon.research.running import MAX_ATTEMPTS, baseline_failure
from daemon.research.stop import StopCondition
from daemon.store.records import ExperimentRecord

if TYPE_CHECKING:
    from daemon.research.session import ResearchSession

log = get_logger("autoresearch.research")

CARRY_OVER_SESSIONS = 5  # how many earlier sessions are searched for work a stop cut short
MAX_INVALID_PROPOSALS = 10  # in a row: the agent is stuck (duplicates, edits that never apply)


class WorkSource:
    """What the lanes of one session run next (see the module docstring)."""

    def __init__(self, session: ResearchSession) -> None:
        self.session = session
        self.refused = ""  # the last proposal refused as a repeat of a tried idea, shown at the next proposal

    def next_experiment(self, lane: Lane, stop: StopCondition) -> ExperimentRecord | None:
        """Queued work first, then what the planner says (`daemon.research.planner`)."""
        with self.session._lock:
            claimed = self.session._claim(lane)
            if claimed is not None:
                return claimed
            rows = self.session.store.list_experiments(session_id=self.session.session_id, limit=100_000)
            plan = planner.next_move(rows, self.session.store.best(self.session.session_id), self.session.settings.judge)
            if plan.move is planner.Move.WAIT:
                return None
            if plan.move is planner.Move.BASELINE_FAILED and plan.failed is not None:
                failed = plan.failed
                self.session._fatal = baseline_failure(failed.id, failed.status, getattr(failed, "error", ""),
                                                getattr(failed, "log_tail", ""))
                return None
            if plan.move is planner.Move.BASELINE:
                start = line_start(self.session.store, self.session.line_id, self.session.session_id)
                source = start.source if start is not None else self.session.workspace.baseline_source()
                self.proposer(lane).prepare_ahead()
                self.session.store.create_experiment(self.session.session_id, "baseline", source, seed=0, description="baseline" + (
                                                 f" (the line's best #{start.id})" if start is not None else ""),
                                             source_hash=normalized_hash(source))
                return self.session._claim(lane)
            if plan.move is planner.Move.NOISE:
                self.proposer(lane).prepare_ahead()  # the first candidate is prepared meanwhile
                baseline = self.baseline_row(rows)
                self.session.store.create_experiment(self.session.session_id, "noise", baseline.source,
                                             description=f"noise floor: baseline with seed {plan.seed}",
                                             seed=plan.seed, source_hash=baseline.source_hash)
                return self.session._claim(lane)
            if self.session._exhausted():
                return None  # `once -n N`: N candidates, no re-measure after the last one
            if plan.move is planner.Move.REMEASURE:
                best = self.session.store.best(self.session.session_id)
                if best is not None:
                    self.session.store.create_experiment(
                        self.session.session_id, "remeasure", best.source, parent_id=best.id,
                        description=f"re-measure the best #{best.id} (seed {plan.seed})", seed=plan.seed,
                        source_hash=best.source_hash)
                    return self.session._claim(lane)
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
        earlier = [s for s in self.session.store.list_sessions(CARRY_OVER_SESSIONS + 1) if s.id < self.session.session_id]
        newest: dict[str, ExperimentRecord] = {}
        for session in earlier[:CARRY_OVER_SESSIONS]:
            for row in self.session.store.list_experiments(session_id=session.id, limit=100_000):
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
        seen = self.session.store.seen_hashes(self.session.session_id)
        while self.session._leftovers:
            row = self.session._leftovers.pop(0)
            if row.source_hash in seen:
                continue  # already redone here (a resumed session)
            best = self.session.store.best(self.session.session_id)
            copy = self.session.store.create_experiment(
                self.session.session_id, row.kind, row.source, parent_id=best.id if best is not None else None,
                description=row.description, hypothesis=row.hypothesis,
                diff=unified_diff(best.source, row.source) if best is not None else row.diff,
                seed=row.seed, attempt=row.attempt + 1, source_hash=row.source_hash)
            log.info("redoing work an earlier session left unfinished", experiment_id=row.id, retry_id=copy.id,
                     previous_status=row.status)
            if row.kind == "candidate":
                self.session._launched_candidates += 1
            return self.session._claim(lane)
        return None

    def near_miss_move(self, lane: Lane) -> ExperimentRecord | None:
        """Under `search = archive`, every few candidates: a near-miss re-tried on the current best (no agent call)."""
        if not planner.archive_turn(self.session._planned_candidates, self.session.settings.judge):
            return None
        self.session._planned_candidates += 1  # this turn is used, whether or not the archive has a move
        best = self.session.store.best(self.session.session_id)
        if best is None:
            return None
        rows = self.session.store.list_experiments(session_id=self.session.session_id, limit=100_000)
        picked = archive.pick_near_miss(rows, best, best.source, self.session.store.seen_hashes(self.session.session_id))
        if picked is None:
            return None
        miss, source = picked
        self.session.store.create_experiment(
            self.session.session_id, "candidate", source, parent_id=best.id, parent2_id=miss.experiment_id,
            description=f"near-miss #{miss.experiment_id} on the best #{best.id}: {miss.description}"[:500],
            hypothesis=f"#{miss.experiment_id} looked better (t = {miss.t:.2f}) but did not prove it; "
                       "re-tried on the current best", diff=unified_diff(best.source, source),
            seed=planner.first_seed(rows, best, self.session.settings.judge),
            source_hash=normalized_hash(source))
        self.session._launched_candidates += 1
        log.info("near-miss move", lane=lane.name, near_miss=miss.experiment_id, best=best.id)
        return self.session._claim(lane)

    def plan_candidate(self, lane: Lane, stop: StopCondition) -> ExperimentRecord | None:
        prepared = self.take_proposal(lane, stop)
        if prepared is None:
            return None
        proposal, source, parent, source_hash = prepared
        with self.session._lock:
            if self.session._exhausted():
                return None
            if source_hash in self.session.store.seen_hashes(self.session.session_id):
                # Another lane queued the same source while this one waited for the lock.
                self.count_invalid("duplicate of an experiment queued meanwhile")
                return None
            record = self.session.store.create_experiment(
                self.session.session_id, "candidate", source, parent_id=parent.id,
                parent2_id=proposal.proposal.combine_with, description=proposal.proposal.description,
                hypothesis=proposal.proposal.hypothesis, diff=unified_diff(parent.source, source),
                seed=planner.first_seed(self.session.store.list_experiments(session_id=self.session.session_id,
                                                                            limit=100_000),
                                        self.session.store.best(self.session.session_id), self.session.settings.judge),
                source_hash=source_hash)
            record_notes(self.session.store, self.session.line_id, self.session.session_id, record.id, proposal.proposal.notes)
            if proposal.fix_of is not None:
                self.session._fix_attempts.add(record.id)
            self.session._launched_candidates += 1
            self.session._planned_candidates += 1
            return self.session._claim(lane)

    def take_proposal(self, lane: Lane,
                       stop: StopCondition) -> tuple[Prepared, str, ExperimentRecord, str] | None:
        """The lane's next proposal, rebased onto the current best when that changed; None on stop.

        A combine (`proposal.combine_with`) is checked against the line's archive and rebuilt here: the
        current best, the proposal's edits, then the near-miss's change.
        Returns (proposal, candidate source, parent, normalized source hash).
        """
        proposer = self.proposer(lane)
        backoff = max(self.session.settings.agent.retry_backoff_s, 0.01)
        while stop.reason() is None and self.session._fatal is None:
            try:
                prepared = proposer.take(stop)
            except CostCapReached as exc:
                stop.request_stop(f"cost cap reached: {exc}")
                return None
            except AgentFatal as exc:
                self.session._fatal = f"the agent cannot continue: {exc}" + (f" ({exc.hint})" if exc.hint else "")
                return None
            except InvalidProposal as exc:
                self.count_invalid(str(exc))
                continue
            except AgentError as exc:
                self.session._agent_error_streak += 1
                if self.session._agent_error_streak >= MAX_INVALID_PROPOSALS:
                    self.session._fatal = (f"the agent failed {self.session._agent_error_streak} times in a row: {exc}"
                                   + (f" ({exc.hint})" if exc.hint else ""))
                    return None
                log.warning("agent failed; retrying after a pause", lane=lane.name, error=str(exc),
                            retry_in_s=backoff, in_a_row=self.session._agent_error_streak)
                stop.wait(backoff)
                backoff = min(backoff * 2, max(self.session.settings.agent.retry_wait_max_s, 0.01))
                continue
            if prepared is None:
                return None
            self.session._agent_error_streak = 0
            proposer.prepare_ahead()  # the next proposal is prepared while this one trains
            best = self.session.store.best(self.session.session_id)
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
                source_hash = validate_candidate(source, self.session.store.seen_hashes(self.session.session_id))
                self.refuse_repeat(best.source, source, prepared.proposal.description)
            except InvalidProposal as exc:
                self.count_invalid(f"proposal refused, asking again: {exc}")
                continue
            self.session._invalid_streak = 0
            return prepared, source, best, source_hash
        return None

    def refuse_repeat(self, best_source: str, source: str, description: str) -> None:
        """`InvalidProposal` when the candidate repeats an idea of the line (checked again here: results that
        arrived since the proposal was written count)."""
        sessions = self.session.store.line_sessions(self.session.line_id)
        memory = idea_memory(self.session.store, line_rows(self.session.store, sessions), len(sessions))
        found = memory.match(best_source, source)
        if found is None:
            return
        ids = ", ".join(f"#{eid}" for eid in found.idea.experiment_ids)
        self.refused = (f"{description}\nrepeats the idea tried as {ids} ({found.why}): {found.idea.description}\n"
                        f"{found.idea.change.text()}")
        raise InvalidProposal(f"repeats the idea tried as {ids} ({found.why})")

    def combined(self, best: ExperimentRecord, prepared: Prepared) -> str:
        """The source of a combine: the best, the edits, the archived near-miss's change (or `InvalidProposal`)."""
        assert prepared.proposal.combine_with is not None
        rows = [row for sid in self.session.store.line_sessions(self.session.line_id)
                for row in self.session.store.list_experiments(session_id=sid, limit=100_000)]
        miss = archive.archived_near_miss(rows, prepared.proposal.combine_with)
        return candidate_source(best.source, prepared.proposal.edits, miss.diff)

    def count_invalid(self, why: str) -> None:
        self.session._invalid_streak += 1
        log.warning("proposal not usable", reason=why[:300], in_a_row=self.session._invalid_streak)
        if self.session._invalid_streak >= MAX_INVALID_PROPOSALS:
            self.session._fatal = (f"the agent produced {self.session._invalid_streak} unusable proposals in a row "
                           f"(last: {why[:200]})")

    def proposer(self, lane: Lane) -> Proposer:
        with self.session._lock:
            if lane.name not in self.session._proposers:
                self.session._proposers[lane.name] = Proposer(self.session.agent, self.context, lane.name, self.session.pipelined,
                                                      self.session._smoke)
            return self.session._proposers[lane.name]

    def context(self, crash: CrashInfo | None) -> ProposalContext:
        best = self.session.store.best(self.session.session_id)
        baseline = self.session.store.baseline(self.session.session_id)
        start = line_start(self.session.store, self.session.line_id, self.session.session_id) if best is None else None
        best_source = best.source if best is not None else (
            start.source if start is not None else self.session.workspace.baseline_source())
        # The best's recorded value: the mean of its fresh runs, not the single run that won its keep.
        best_val = measurements.recorded_value(
            self.session.store.list_experiments(session_id=self.session.session_id, limit=100_000), best) \
            if best is not None else None
        rows = self.session.store.history(self.session.session_id, self.session.settings.agent.history_size)
        known = {row.id: row for row in rows}
        history = tuple(HistoryItem(r.id, r.status, r.val_bpb, self.delta(r, known), r.description)
                        for r in rows)
        sessions = self.session.store.line_sessions(self.session.line_id)
        line = line_rows(self.session.store, sessions)
        retests = keep_notes(self.session.store, sessions, line)  # the morning re-tests' marks of the line's keeps
        ledger = ledger_from_rows(line, self.session.store.noise_floor(self.session.session_id), self.session.session_id,
                                  self.session.settings.judge, nights=len(sessions), session_ids=tuple(sessions),
                                  retests=retests)
        refused, self.refused = self.refused, ""
        return ProposalContext(
            session_id=self.session.session_id, program_md=self.session._program_md, best_source=best_source,
            best_id=best.id if best is not None else None, best_val_bpb=best_val,
            baseline_val_bpb=baseline.val_bpb if baseline is not None else None, history=history,
            seen_hashes=line_seen_hashes(self.session.store, self.session.line_id), crash=crash,
            cost_since=self.session.cost_since, ledger=ledger,
            ideas=idea_memory(self.session.store, line, len(sessions), retests=retests),
            fence_nonce=self.session.store.line_nonce(self.session.line_id), refused=refused,
            notebook=notebook_text(self.session.store, self.session.line_id),
            environment=describe_environment(self.session.settings, self.session.lanes, baseline, visible_gpus(self.session.runner)),
        )

    def delta(self, row: ExperimentRecord, known: dict[int, ExperimentRecord]) -> float | None:
        """val_bpb minus the best's at the time (the row's parent); None when that is unknown."""
        if row.val_bpb is None:
            return None
        parent = self.row(row.parent_id, known)
        if row.kind == "confirm" and parent is not None:
            parent = self.row(parent.parent_id, known)  # a confirmation repeats its candidate
        if parent is None or parent.val_bpb is None:
            return None
        return float(row.val_bpb - parent.val_bpb)

    def row(self, experiment_id: int | None, known: dict[int, ExperimentRecord]) -> ExperimentRecord | None:
        if experiment_id is None:
            return None
        if experiment_id not in known:
            found = self.session.store.get_experiment(experiment_id)
            if found is None:
                return None
            known[experiment_id] = found
        return known[experiment_id]
