"""What the agent is shown before it proposes, and the check that a proposal is not a tried idea again.

- `RepeatGuard.refuse_repeat`: a proposal that repeats an idea the line already tried
  (`daemon.research.ideas`) is refused before it is queued; what was refused is kept and shown to the
  agent at its next proposal;
- `Briefing.context`: the `ProposalContext` of a proposal (the best, the history with each row's delta,
  the ledger, idea memory, notebook, environment, the line's fence nonce, the last refused repeat).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from daemon.agents import CrashInfo, HistoryItem, ProposalContext
from daemon.config import Settings
from daemon.errors import InvalidProposal
from daemon.research import measurements
from daemon.research.environment import describe_environment, visible_gpus
from daemon.research.ideas import idea_memory
from daemon.research.lanes import Lane
from daemon.research.ledger import ledger_from_rows, line_rows
from daemon.research.line import line_seen_hashes, line_start, notebook_text
from daemon.research.retest import keep_notes
from daemon.research.workspace import Workspace
from daemon.store.records import ExperimentRecord


class RepeatGuard:
    """Refuses a proposal that repeats an idea of the research line; remembers the last one refused."""

    def __init__(self, store: Any, line_id: Callable[[], int]) -> None:
        self.store = store
        self.line_id = line_id
        self.refused = ""  # the last proposal refused as a repeat of a tried idea, shown at the next proposal

    def refuse_repeat(self, best_source: str, source: str, description: str) -> None:
        """`InvalidProposal` when the candidate repeats an idea of the line (checked again here: results that
        arrived since the proposal was written count)."""
        sessions = self.store.line_sessions(self.line_id())
        memory = idea_memory(self.store, line_rows(self.store, sessions), len(sessions))
        found = memory.match(best_source, source)
        if found is None:
            return
        ids = ", ".join(f"#{eid}" for eid in found.idea.experiment_ids)
        self.refused = (f"{description}\nrepeats the idea tried as {ids} ({found.why}): {found.idea.description}\n"
                        f"{found.idea.change.text()}")
        raise InvalidProposal(f"repeats the idea tried as {ids} ({found.why})")


    def take_refused(self) -> str:
        """The last refused repeat (shown once, at the next proposal)."""
        refused, self.refused = self.refused, ""
        return refused


class Briefing:
    """The agent's view of one session when it proposes (see the module docstring)."""

    def __init__(self, *, settings: Settings, store: Any, workspace: Workspace, lanes: Sequence[Lane], runner: Any,
                 repeats: RepeatGuard, session_id: Callable[[], int], line_id: Callable[[], int],
                 program_md: Callable[[], str], cost_since: datetime | None = None) -> None:
        self.settings = settings
        self.store = store
        self.workspace = workspace
        self.lanes = lanes
        self.runner = runner
        self.repeats = repeats
        self.session_id = session_id
        self.line_id = line_id
        self.program_md = program_md
        self.cost_since = cost_since

    def context(self, crash: CrashInfo | None) -> ProposalContext:
        """What the agent is shown for its next proposal (`crash`: the failure it may fix)."""
        best = self.store.best(self.session_id())
        baseline = self.store.baseline(self.session_id())
        start = line_start(self.store, self.line_id(), self.session_id()) if best is None else None
        best_source = best.source if best is not None else (
            start.source if start is not None else self.workspace.baseline_source())
        # The best's recorded value: the mean of its fresh runs, not the single run that won its keep.
        best_val = measurements.recorded_value(
            self.store.list_experiments(session_id=self.session_id(), limit=100_000), best) \
            if best is not None else None
        rows = self.store.history(self.session_id(), self.settings.agent.history_size)
        known = {row.id: row for row in rows}
        history = tuple(HistoryItem(r.id, r.status, r.val_bpb, self.delta(r, known), r.description)
                        for r in rows)
        sessions = self.store.line_sessions(self.line_id())
        line = line_rows(self.store, sessions)
        retests = keep_notes(self.store, sessions, line)  # the morning re-tests' marks of the line's keeps
        ledger = ledger_from_rows(line, self.store.noise_floor(self.session_id()), self.session_id(),
                                  self.settings.judge, nights=len(sessions), session_ids=tuple(sessions),
                                  retests=retests)
        refused = self.repeats.take_refused()
        return ProposalContext(
            session_id=self.session_id(), program_md=self.program_md(), best_source=best_source,
            best_id=best.id if best is not None else None, best_val_bpb=best_val,
            baseline_val_bpb=baseline.val_bpb if baseline is not None else None, history=history,
            seen_hashes=line_seen_hashes(self.store, self.line_id()), crash=crash,
            cost_since=self.cost_since, ledger=ledger,
            ideas=idea_memory(self.store, line, len(sessions), retests=retests),
            fence_nonce=self.store.line_nonce(self.line_id()), refused=refused,
            notebook=notebook_text(self.store, self.line_id()),
            environment=describe_environment(self.settings, self.lanes, baseline, visible_gpus(self.runner)),
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
            found = self.store.get_experiment(experiment_id)
            if found is None:
                return None
            known[experiment_id] = found
        return known[experiment_id]
