"""The offline fallback: an LLM outage or the cost cap hands proposals to the offline agent, and back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from daemon.agents import make_agent
from daemon.agents.anthropic_agent import AnthropicAgent
from daemon.agents.fallback import FallbackAgent
from daemon.agents.offline import OfflineAgent
from daemon.config import Settings
from daemon.errors import AgentError, AgentFatal
from daemon.store.records import AgentCallRecord
from tests.agents.support import MemorySink, RecordingClock, make_context
from tests.fakes.anthropic_server import FakeAnthropicServer, error_reply, tool_reply

GOOD = {"hypothesis": "h", "edits": [{"search": "MATRIX_LR = 0.02", "replace": "MATRIX_LR = 0.03"}],
        "description": "raise MATRIX_LR 0.02 -> 0.03"}
MakeAgent = Callable[..., AnthropicAgent]


def _fallback(llm: AnthropicAgent, sink: MemorySink, clock: RecordingClock, **times: float) -> FallbackAgent:
    return FallbackAgent(llm, OfflineAgent(), sink, clock, after_s=times.get("after_s", 600.0),
                         retry_s=times.get("retry_s", 300.0))


def _offline_calls(sink: MemorySink) -> list[AgentCallRecord]:
    return [record for record in sink.records if record.outcome == "fallback"]


def test_outage_hands_the_lane_to_the_offline_agent_and_back(server: FakeAnthropicServer, make_anthropic: MakeAgent,
                                                             sink: MemorySink, clock: RecordingClock) -> None:
    """Failures shorter than fallback_after_s are raised; longer ones give offline proposals; the LLM returns."""
    agent = _fallback(make_anthropic(max_retries=0), sink, clock, after_s=600, retry_s=300)
    server.enqueue(error_reply(500, "down"), error_reply(529, "down"))
    with pytest.raises(AgentError):
        agent.propose(make_context())  # the outage starts: the session waits and asks again
    clock.sleep(601)
    offline = agent.propose(make_context())  # down for over 600 s: the offline agent proposes
    assert agent.on_fallback and offline.hypothesis.startswith("[offline agent while the LLM is unavailable]")
    requests_while_offline = len(server.requests)
    agent.propose(make_context())  # within the retry interval the LLM is not asked
    assert len(server.requests) == requests_while_offline == 2
    server.enqueue(tool_reply(GOOD))
    clock.sleep(301)
    back = agent.propose(make_context())
    assert back.description == GOOD["description"] and not agent.on_fallback
    assert len(_offline_calls(sink)) == 2 and "LLM API failing" in _offline_calls(sink)[0].error


def test_cost_cap_switches_at_once_without_a_request(server: FakeAnthropicServer, make_anthropic: MakeAgent,
                                                     sink: MemorySink, clock: RecordingClock) -> None:
    """At the nightly cap the offline agent proposes at once and no API request is sent."""
    sink.record_agent_call(AgentCallRecord(provider="anthropic", model="claude-sonnet-5-5", cost_usd=5.0))
    agent = _fallback(make_anthropic(nightly_cost_cap_usd=5.0), sink, clock)
    proposal = agent.propose(make_context())
    assert server.requests == [] and agent.on_fallback
    assert proposal.source != make_context().best_source
    assert "cost cap" in _offline_calls(sink)[0].error


def test_fatal_errors_are_not_an_outage(server: FakeAnthropicServer, make_anthropic: MakeAgent, sink: MemorySink,
                                        clock: RecordingClock) -> None:
    """A rejected key still stops the session: the offline agent does not hide a broken set-up."""
    server.enqueue(error_reply(401, "bad key"))
    with pytest.raises(AgentFatal):
        _fallback(make_anthropic(), sink, clock, after_s=0).propose(make_context())
    assert _offline_calls(sink) == []


@pytest.mark.parametrize(("fallback", "wrapped"), [("offline", True), ("none", False)])
def test_make_agent_wraps_the_llm_unless_told_not_to(fallback: str, wrapped: bool) -> None:
    """agent.fallback = offline (the default) wraps the LLM agent; none leaves it bare."""
    fields: dict[str, Any] = {"api_key": "sk-test", "fallback": fallback}
    agent = make_agent(Settings(agent=fields), MemorySink(), RecordingClock())
    assert isinstance(agent, FallbackAgent) is wrapped and agent.name == "anthropic"


def test_report_says_when_the_offline_agent_stood_in(tmp_path: Any) -> None:
    """The morning report counts the proposals the offline agent made while the LLM was unavailable."""
    from daemon.ops.report import write_report
    from daemon.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    store.upgrade()
    try:
        session = store.create_session("s", "once", "p", {})
        store.record_agent_call(AgentCallRecord(provider="anthropic", model="m", outcome="error", session_id=session.id))
        for _ in range(3):
            store.record_agent_call(AgentCallRecord(provider="offline", model="offline", outcome="fallback",
                                                    session_id=session.id))
        report = write_report(store, session.id, tmp_path / "reports").read_text()
    finally:
        store.close()
    assert "- LLM calls: anthropic error 1" in report
    assert "**3 proposal(s) came from the offline agent**" in report
