"""Rules of the research loop that need no training: session ownership, stale whole-file proposals,
agent failures in a row, history deltas and dropped confirmations. Real Postgres store, real workspace;
the agent is scripted at its protocol seam (the loop's edge)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from daemon.agents import Edit, Proposal, ProposalContext
from daemon.agents.edits import normalized_hash
from daemon.errors import AgentError, InvalidProposal
from daemon.research import MAX_INVALID_PROPOSALS, ResearchSession
from daemon.research.stop import StopCondition
from daemon.service.runtime import Runtime, open_runtime
from daemon.store.records import SESSION_OPEN, ExperimentRecord

pytestmark = [pytest.mark.postgres]


class ScriptedAgent:
    """An agent that answers each `propose` with the next scripted step (a callable of the context)."""

    name = "scripted"

    def __init__(self, steps: list[Callable[[ProposalContext], Proposal]]) -> None:
        self.steps = steps
        self.contexts: list[ProposalContext] = []

    def propose(self, ctx: ProposalContext) -> Proposal:
        self.contexts.append(ctx)
        step = self.steps[min(len(self.contexts), len(self.steps)) - 1]
        return step(ctx)


def _raise(exc: Exception) -> Callable[[ProposalContext], Proposal]:
    def step(_ctx: ProposalContext) -> Proposal:
        raise exc
    return step


@pytest.fixture()
def runtime(tiny_settings: Any) -> Iterator[Runtime]:
    rt = open_runtime(tiny_settings(agent={"retry_backoff_s": 0, "retry_wait_max_s": 0}), daemon=False)
    try:
        yield rt
    finally:
        rt.close()


def _session(runtime: Runtime, agent: Any = None, **kwargs: Any) -> ResearchSession:
    return ResearchSession(settings=runtime.settings, store=runtime.store, workspace=runtime.workspace,
                           runner=runtime.runner, agent=agent or runtime.agent, lanes=runtime.lanes[:1],
                           owner=runtime.owner, **kwargs)


def _finished(runtime: Runtime, session_id: int, kind: str, source: str, val_bpb: float,
              parent_id: int | None = None, status: str = "kept") -> ExperimentRecord:
    """A row measured by an earlier run (queued, claimed, evaluated, then `status`)."""
    store = runtime.store
    row = store.create_experiment(session_id, kind, source, parent_id=parent_id, description=kind,
                                  source_hash=normalized_hash(source))
    claimed = store.claim_next(session_id, "earlier-owner", "lane0", None, 60.0)
    assert claimed is not None and claimed.id == row.id
    store.transition(row.id, "running", "evaluating", owner="earlier-owner")
    final: ExperimentRecord = store.transition(row.id, "evaluating", status, owner="earlier-owner", val_bpb=val_bpb)
    return final


def test_end_session_already_ended_is_not_an_error(runtime: Runtime) -> None:
    """A session ended by someone else meanwhile is logged as already ended, not raised out of run()."""
    session = _session(runtime)
    record = session.open(resume=False)
    runtime.store.end_session(record.id, "completed")
    stop = StopCondition(grace_s=0)
    stop.request_stop("test stop")
    summary = session.run(stop)
    assert summary.status == "completed"


def test_a_resumed_session_is_left_open_unless_adopted(runtime: Runtime) -> None:
    """A session joined by resuming it stays open after run(); the creator (or an adopter) ends it."""
    owner = _session(runtime)
    record = owner.open(resume=False)
    joiner = _session(runtime)
    assert joiner.open().id == record.id
    stop = StopCondition(grace_s=0)
    stop.request_stop("test stop")
    joiner.run(stop)
    still = runtime.store.get_session(record.id)
    assert still is not None and still.status == SESSION_OPEN
    adopter = _session(runtime)
    adopter.open(adopt=True)
    adopter.run(stop)
    ended = runtime.store.get_session(record.id)
    assert ended is not None and ended.status != SESSION_OPEN


def test_signal_stop_ends_the_session_interrupted(runtime: Runtime) -> None:
    """The session's status is `interrupted` when a signal stopped it, whatever the reason text."""
    session = _session(runtime)
    session.open(resume=False)
    stop = StopCondition(grace_s=0)
    stop.signal("shutdown signal")
    assert session.run(stop).status == "interrupted"


def test_whole_file_proposal_against_an_older_best_is_asked_again(runtime: Runtime, baseline_source: str) -> None:
    """A whole-file proposal made before another lane kept a new best is not rebased (it would undo it)."""
    session_holder: dict[str, ResearchSession] = {}
    newer = baseline_source + "\nBEST_CHANGE = 2\n"

    def stale_whole_file(ctx: ProposalContext) -> Proposal:
        source = ctx.best_source + "\nIDEA_ONE = 1\n"
        sid = session_holder["s"].session_id
        best = runtime.store.best(sid)
        assert best is not None
        _finished(runtime, sid, "candidate", newer, 1.5, parent_id=best.id)  # another lane keeps a new best
        return Proposal("idea one", "h", (Edit("", source),), source)

    def fresh_edit(ctx: ProposalContext) -> Proposal:
        edit = Edit("BEST_CHANGE = 2\n", "BEST_CHANGE = 2\nIDEA_TWO = 3\n")
        return Proposal("idea two", "h", (edit,), ctx.best_source.replace(edit.search, edit.replace))

    agent = ScriptedAgent([stale_whole_file, fresh_edit])
    session = _session(runtime, agent, pipelined=False)
    session_holder["s"] = session
    sid = session.open(resume=False).id
    _finished(runtime, sid, "baseline", baseline_source, 2.0)
    taken = session.work.take_proposal(runtime.lanes[0], StopCondition(grace_s=0))
    assert taken is not None
    _, source, parent, _ = taken
    assert "BEST_CHANGE = 2" in source and "IDEA_TWO = 3" in source and "IDEA_ONE" not in source
    assert parent.source == newer
    assert len(agent.contexts) == 2


@pytest.mark.parametrize(("failure", "reason"), [
    (AgentError("server error 529"), "failed"),
    (InvalidProposal("the repair rounds ran out"), "unusable proposals"),
])
def test_an_agent_failing_in_a_row_ends_the_session(runtime: Runtime, baseline_source: str,
                                                    failure: Exception, reason: str) -> None:
    """Agent errors (temporary or invalid proposals) in a row end the session as failed instead of retrying forever."""
    agent = ScriptedAgent([_raise(failure)])
    session = _session(runtime, agent, pipelined=False)
    sid = session.open(resume=False).id
    _finished(runtime, sid, "baseline", baseline_source, 2.0)
    summary = session.run(StopCondition(grace_s=0))
    assert summary.status == "failed"
    assert reason in summary.stop_reason
    assert len(agent.contexts) == MAX_INVALID_PROPOSALS


def test_history_delta_is_against_the_best_at_the_time(runtime: Runtime, baseline_source: str) -> None:
    """Each history item's delta compares with its parent (the best when it ran), not today's best."""
    session = _session(runtime)
    sid = session.open(resume=False).id
    base = _finished(runtime, sid, "baseline", baseline_source, 2.0)
    first = _finished(runtime, sid, "candidate", baseline_source + "\nA = 1\n", 1.9, parent_id=base.id)
    second = _finished(runtime, sid, "candidate", baseline_source + "\nB = 1\n", 1.95, parent_id=first.id,
                       status="discarded")
    deltas = {item.id: item.delta for item in session.briefing.context(None).history}
    assert deltas[base.id] is None
    assert deltas[first.id] == pytest.approx(-0.1)
    assert deltas[second.id] == pytest.approx(0.05)


def test_stop_drops_the_queued_confirmation_of_an_interrupted_candidate(runtime: Runtime,
                                                                        baseline_source: str) -> None:
    """A close call's queued confirmation run is interrupted with its candidate when the session stops."""
    session = _session(runtime)
    sid = session.open(resume=False).id
    base = _finished(runtime, sid, "baseline", baseline_source, 2.0)
    noise = _finished(runtime, sid, "noise", baseline_source, 2.01, status="measured")
    assert base.id < noise.id
    source = baseline_source + "\nCLOSE = 1\n"
    candidate = runtime.store.create_experiment(sid, "candidate", source, source_hash=normalized_hash(source))
    assert session.board.claim(runtime.lanes[0]) is not None
    runtime.store.transition(candidate.id, "running", "evaluating", owner=runtime.owner)
    sigma = 0.01 / math.sqrt(2)  # the sample std of 2.0 and 2.01
    close = 2.005 - 2.0 * sigma * math.sqrt(1 + 1 / 2)  # t = 2: far below the keep bar at df 1, above futility
    assert session.keeper.record(candidate, close, {"val_bpb": close}) == "evaluating"
    stop = StopCondition(grace_s=0)
    stop.request_stop("window ended")
    session.run(stop)
    rows = runtime.store.list_experiments(session_id=sid, limit=20)
    assert {(r.kind, r.status) for r in rows if r.kind in ("candidate", "confirm")} == {
        ("candidate", "interrupted"), ("confirm", "interrupted")}
