"""The OpenAI-compatible agent through the real `openai` SDK against the fake Chat Completions server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

from daemon.agents import ChangeEntry, LedgerView, make_agent
from daemon.agents.openai_agent import OpenAIAgent
from daemon.config import AgentConfig, load_settings
from daemon.errors import AgentFatal, ConfigError, InvalidProposal
from daemon.research.archive import unified_diff
from tests.agents.conftest import OPENAI_PRICES
from tests.agents.support import BASELINE, MemorySink, RecordingClock, make_context
from tests.fakes.openai_server import (
    MODEL,
    FakeOpenAIServer,
    openai_error,
    text_completion,
    tool_call_reply,
)

GOOD = {"hypothesis": "the matrices are under-trained", "edits": [{"search": "MATRIX_LR = 0.02",
        "replace": "MATRIX_LR = 0.03"}], "description": "raise MATRIX_LR 0.02 -> 0.03", "notebook": "LR next."}
PRICES = OPENAI_PRICES
MakeAgent = Callable[..., OpenAIAgent]


def test_proposal_through_a_function_call(chat: FakeOpenAIServer, make_openai: MakeAgent, sink: MemorySink) -> None:
    """A function call becomes a validated proposal with its notebook entry; the call is recorded and priced."""
    chat.enqueue(tool_call_reply(GOOD, usage={"prompt_tokens": 1000, "completion_tokens": 100,
                                              "prompt_tokens_details": {"cached_tokens": 600}}))
    proposal = make_openai().propose(make_context())
    assert "MATRIX_LR = 0.03" in proposal.source and proposal.notes == "LR next."
    record = sink.records[0]
    assert (record.provider, record.input_tokens, record.cache_read_tokens, record.output_tokens) == (
        "openai", 400, 600, 100)
    assert record.cost_usd == pytest.approx((400 * 2.0 + 600 * 0.5 + 100 * 8.0) / 1e6)


def test_request_shape(chat: FakeOpenAIServer, make_openai: MakeAgent) -> None:
    """System message with the program and prepare.py, the best source, the two function tools, a call required."""
    chat.enqueue(tool_call_reply(GOOD))
    make_openai().propose(make_context())
    body = chat.requests[0].body
    assert chat.rejections == []
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "# Research program" in body["messages"][0]["content"] and "def evaluate_bpb(" in body["messages"][0]["content"]
    assert BASELINE in body["messages"][1]["content"]
    assert body["tool_choice"] == "required"  # propose_experiment or search_ideas
    assert [tool["function"]["name"] for tool in body["tools"]] == ["propose_experiment", "search_ideas"]
    assert all(tool["function"]["parameters"]["type"] == "object" for tool in body["tools"])


def test_without_searches_the_proposal_is_forced(chat: FakeOpenAIServer, make_openai: MakeAgent) -> None:
    """With agent.idea_searches = 0 the only tool is propose_experiment, and it is forced."""
    chat.enqueue(tool_call_reply(GOOD))
    make_openai(idea_searches=0).propose(make_context())
    body = chat.requests[0].body
    assert body["tool_choice"] == {"type": "function", "function": {"name": "propose_experiment"}}
    assert [tool["function"]["name"] for tool in body["tools"]] == ["propose_experiment"]
    assert "search_ideas" not in body["messages"][0]["content"]


def test_bad_edit_is_answered_by_a_tool_message(chat: FakeOpenAIServer, make_openai: MakeAgent) -> None:
    """A failing edit goes back as a tool message answering the call's id; the fix is accepted."""
    bad = {**GOOD, "edits": [{"search": "MATRIX_LR = 0.9", "replace": "x"}]}
    chat.enqueue(tool_call_reply(bad), tool_call_reply(GOOD))
    make_openai().propose(make_context())
    assert chat.rejections == []
    messages = chat.requests[1].body["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[3]["tool_call_id"] == messages[2]["tool_calls"][0]["id"]
    assert "search text does not occur" in messages[3]["content"]


def test_arguments_that_are_not_json_are_repaired(chat: FakeOpenAIServer, make_openai: MakeAgent) -> None:
    """Arguments that do not parse as JSON are reported precisely and a corrected call is accepted."""
    chat.enqueue(tool_call_reply(None, raw_arguments='{"hypothesis": "x", '), tool_call_reply(GOOD))
    make_openai().propose(make_context())
    assert "not valid JSON" in chat.requests[1].body["messages"][-1]["content"]


def test_text_reply_is_asked_for_the_call(chat: FakeOpenAIServer, make_openai: MakeAgent) -> None:
    """A plain text answer is followed by a user turn asking for the function call."""
    chat.enqueue(text_completion("I would raise the LR."), tool_call_reply(GOOD))
    make_openai().propose(make_context())
    assert chat.rejections == []
    assert chat.requests[1].body["messages"][-1]["role"] == "user"


def test_repairs_run_out(chat: FakeOpenAIServer, make_openai: MakeAgent) -> None:
    """After repair_rounds failed repairs the agent gives up with the last problem."""
    chat.enqueue(tool_call_reply({"hypothesis": "h"}), tool_call_reply({"hypothesis": "h"}))
    with pytest.raises(InvalidProposal, match="description is missing"):
        make_openai(repair_rounds=1).propose(make_context())


def test_rate_limit_is_retried(chat: FakeOpenAIServer, make_openai: MakeAgent, clock: RecordingClock) -> None:
    """A 429 with retry-after waits that long through the clock, then succeeds."""
    chat.enqueue(openai_error(429, "slow down", headers={"retry-after": "3"}), tool_call_reply(GOOD))
    make_openai().propose(make_context())
    assert clock.sleeps == [3.0]


def test_bad_request_is_fatal(chat: FakeOpenAIServer, make_openai: MakeAgent) -> None:
    """A 400 is not retried."""
    chat.enqueue(openai_error(400, "model not found here"))
    with pytest.raises(AgentFatal, match="model not found here"):
        make_openai().propose(make_context())
    assert len(chat.requests) == 1


def test_needs_a_key_or_a_local_server(sink: MemorySink, clock: RecordingClock) -> None:
    """Without a key and without base_url the agent refuses to start, saying what to set."""
    with pytest.raises(ConfigError, match="needs an API key, or base_url"):
        OpenAIAgent(AgentConfig(provider="openai", model=MODEL, prices=PRICES), sink, clock)


def test_make_agent_selects_the_openai_provider(chat: FakeOpenAIServer, sink: MemorySink,
                                                clock: RecordingClock) -> None:
    """provider = openai in the settings gives the OpenAI-compatible agent."""
    settings = load_settings(None, agent={"provider": "openai", "base_url": chat.url, "model": MODEL,
                                          "prices": {MODEL: {"input": 0, "output": 0}}})
    assert make_agent(settings, sink, clock).name == "openai"


@pytest.mark.parametrize(("request_fields", "message"), [
    ({"messages": []}, "at least one message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "user", "content": "y"}]}, "must be followed by tool messages"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "call_9", "content": "r"}]},
     "must be a response to a preceeding message"),
    ({"tool_choice": {"type": "function", "function": {"name": "other"}}}, "no function named 'other'"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!", "parameters": {"type": "object"}}}]},
     "Invalid 'tools"),
])
def test_fake_refuses_what_the_real_api_refuses(chat: FakeOpenAIServer, request_fields: dict[str, Any],
                                                message: str) -> None:
    """Requests of the wrong shape get a 400 from the fake, as from the real API."""
    client = openai.OpenAI(api_key="x", base_url=chat.url, max_retries=0)
    request: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                               "tools": [{"type": "function", "function": {"name": "f",
                                                                            "parameters": {"type": "object"}}}],
                               **request_fields}
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(**request)


def test_combine_through_a_function_call(chat: FakeOpenAIServer, make_openai: MakeAgent) -> None:
    """A function call with base "combine:<id>" of a ledger near-miss gives the edits plus that change."""
    near = ChangeEntry(id=7, val_bpb=1.249, delta=-0.001, description="knob",
                       diff=unified_diff(BASELINE, BASELINE + "\nNEAR_MISS_KNOB = 1\n"))
    ledger = LedgerView(nights=1, runs=(), kept=(), near_misses=(near,), crashes=(), in_flight=(),
                        noise_sigma=None, noise_n=0, keep_margin=None, margin_rule="")
    chat.enqueue(tool_call_reply({**GOOD, "base": "combine:7"}))
    proposal = make_openai().propose(make_context(ledger=ledger))
    assert proposal.combine_with == 7
    assert "MATRIX_LR = 0.03" in proposal.source and "NEAR_MISS_KNOB = 1" in proposal.source
