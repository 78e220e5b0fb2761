"""Agent-proposed combines inside a session on a real Postgres store: the loop checks the named near-miss
against the line's archive, rebuilds the candidate on the best and records both parents. The agent is
scripted at its protocol seam (the loop's edge)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
import structlog.testing

from daemon.agents import Edit, Proposal, ProposalContext
from daemon.agents.combine import candidate_source, combinable_ids
from daemon.agents.edits import normalized_hash
from daemon.research import ResearchSession
from daemon.research.archive import unified_diff
from daemon.research.stop import StopCondition
from daemon.service.runtime import Runtime, open_runtime
from daemon.store.records import ExperimentRecord
from tests.daemon.rows import finished
from tests.daemon.test_research_rules import ScriptedAgent

pytestmark = [pytest.mark.postgres]

FUTURE = "from __future__ import annotations\n"
AGENT_EDIT = Edit(search="BEST = 1\n", replace="BEST = 1\nAGENT_KNOB = 2\n")


def _combine(experiment_id: int, diff: str) -> Callable[[ProposalContext], Proposal]:
    def step(ctx: ProposalContext) -> Proposal:
        source = candidate_source(ctx.best_source, [AGENT_EDIT], diff)
        return Proposal(description=f"agent knob on near-miss #{experiment_id}", hypothesis="both help",
                        edits=(AGENT_EDIT,), source=source, combine_with=experiment_id)
    return step


@pytest.fixture()
def runtime(tiny_settings: Any) -> Iterator[Runtime]:
    rt = open_runtime(tiny_settings(judge={"noise_runs": 2, "remeasure_after_keep": 1, "max_runs": 3},
                                    training={"smoke": False}), daemon=False)
    try:
        yield rt
    finally:
        rt.close()


def _night(runtime: Runtime, baseline_source: str,
           agent: ScriptedAgent) -> tuple[ResearchSession, ExperimentRecord, ExperimentRecord]:
    """A session with baseline, noise, a near-miss (t 1.4) and a re-measured best: the next move is a candidate."""
    session = ResearchSession(settings=runtime.settings, store=runtime.store, workspace=runtime.workspace,
                              runner=runtime.runner, agent=agent, lanes=runtime.lanes[:1], owner=runtime.owner,
                              pipelined=False)
    sid = session.open(resume=False).id
    digest = normalized_hash(baseline_source)
    base = finished(runtime.store, sid, "baseline", baseline_source, 2.00, source_hash=digest)
    for value in (2.01, 1.99):
        finished(runtime.store, sid, "noise", baseline_source, value, status="measured", source_hash=digest)
    near_source = baseline_source + "\nNEAR = 1\n"
    near = finished(runtime.store, sid, "candidate", near_source, 1.99, status="discarded", parent_id=base.id,
                    source_hash=normalized_hash(near_source), diff=unified_diff(baseline_source, near_source),
                    verdict={"t": 1.4, "improvement": 0.01, "sigma": 0.01, "n": 3})
    best_source = baseline_source.replace(FUTURE, FUTURE + "BEST = 1\n", 1)
    assert best_source != baseline_source
    best = finished(runtime.store, sid, "candidate", best_source, 1.9, parent_id=base.id,
                    source_hash=normalized_hash(best_source), diff=unified_diff(baseline_source, best_source))
    finished(runtime.store, sid, "remeasure", best_source, 1.91, status="measured", parent_id=best.id,
             source_hash=normalized_hash(best_source))
    return session, best, near


def test_combine_records_both_parents_and_both_changes(runtime: Runtime, baseline_source: str) -> None:
    """A combine proposal becomes a candidate with parent = the best, parent2 = the near-miss, both changes."""
    agent = ScriptedAgent([])
    session, best, near = _night(runtime, baseline_source, agent)
    agent.steps = [_combine(near.id, near.diff)]
    move = session.work.next_experiment(runtime.lanes[0], StopCondition(grace_s=0))
    assert move is not None and move.kind == "candidate"
    assert (move.parent_id, move.parent2_id) == (best.id, near.id)
    assert FUTURE + "BEST = 1\nAGENT_KNOB = 2\n" in move.source and move.source.endswith("\nNEAR = 1\n")
    assert near.id in combinable_ids(agent.contexts[0])


def test_combine_of_a_non_archived_id_is_refused(runtime: Runtime, baseline_source: str) -> None:
    """Naming the kept best (not a near-miss) is an unusable proposal; the agent is asked again."""
    agent = ScriptedAgent([])
    session, best, near = _night(runtime, baseline_source, agent)
    agent.steps = [_combine(best.id, near.diff), _combine(near.id, near.diff)]
    with structlog.testing.capture_logs() as logs:
        move = session.work.next_experiment(runtime.lanes[0], StopCondition(grace_s=0))
    assert len(agent.contexts) == 2
    assert move is not None and move.parent2_id == near.id
    candidates = runtime.store.list_experiments(session_id=move.session_id, kind="candidate")
    assert all(row.parent2_id != best.id for row in candidates)
    assert any(f"#{best.id} (candidate, kept) is not an archived near-miss" in str(entry.get("reason"))
               for entry in logs)


def test_combine_of_an_unknown_id_is_refused(runtime: Runtime, baseline_source: str) -> None:
    """An id that is no experiment of the line is refused before anything is queued."""
    agent = ScriptedAgent([])
    session, _best, near = _night(runtime, baseline_source, agent)
    agent.steps = [_combine(10**9, near.diff), _combine(near.id, near.diff)]
    with structlog.testing.capture_logs() as logs:
        move = session.work.next_experiment(runtime.lanes[0], StopCondition(grace_s=0))
    assert len(agent.contexts) == 2 and move is not None and move.parent2_id == near.id
    assert any(f"#{10**9} is not an experiment of this research line" in str(entry.get("reason"))
               for entry in logs)
