"""The fake Messages API refuses what the real one refuses, so an agent request of the wrong shape fails tests."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from tests.fakes.anthropic_server import MODEL, FakeAnthropicServer, tool_reply

TOOL = {"name": "propose_experiment", "input_schema": {"type": "object", "properties": {}}}
USER = {"role": "user", "content": "propose"}
THINKING = {"type": "enabled", "budget_tokens": 2000}


def _cached(ttl: str) -> dict[str, Any]:
    return {"type": "text", "text": f"block cached for {ttl}", "cache_control": {"type": "ephemeral", "ttl": ttl}}


def _tool_turn(tool_id: str = "toolu_1") -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "tool_use", "id": tool_id, "name": "propose_experiment",
                                              "input": {}}]}


def _result(tool_id: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": "bad"}]}


REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "forced tool with thinking": (
        {"thinking": THINKING, "tool_choice": {"type": "tool", "name": "propose_experiment"}},
        "tool_choice forces tool use"),
    "any tool with thinking": ({"thinking": THINKING, "tool_choice": {"type": "any"}}, "tool_choice forces tool use"),
    "thinking budget under 1024": ({"thinking": {"type": "enabled", "budget_tokens": 1000}}, "greater than or equal"),
    "thinking budget at max_tokens": ({"thinking": {"type": "enabled", "budget_tokens": 4096}},
                                      "must be greater than `thinking.budget_tokens`"),
    "temperature with thinking": ({"thinking": THINKING, "extra_body": {"temperature": 0.5}}, "temperature"),
    "top_k with thinking": ({"thinking": THINKING, "extra_body": {"top_k": 5}}, "top_k"),
    "two user turns in a row": ({"messages": [USER, USER]}, "roles must alternate"),
    "assistant first": ({"messages": [{"role": "assistant", "content": "hi"}, USER]}, "roles must alternate"),
    "tool_use left unanswered": ({"messages": [USER, _tool_turn(), USER]}, "without `tool_result`"),
    "tool_result for an unknown id": ({"messages": [USER, _tool_turn(), _result("toolu_9")]},
                                      "unexpected `tool_use_id`"),
    "tool use without thinking first": ({"thinking": THINKING, "messages": [USER, _tool_turn(), _result("toolu_1")]},
                                        "Expected `thinking`"),
    "thinking block altered": (
        {"thinking": THINKING, "messages": [USER, {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "edited thoughts", "signature": "sig_forged"},
            {"type": "tool_use", "id": "toolu_1", "name": "propose_experiment", "input": {}}]}, _result("toolu_1")]},
        "Invalid `signature`"),
    "five cache breakpoints": ({"system": [_cached("1h")] * 5}, "maximum of 4"),
    "unknown ttl": ({"system": [_cached("2h")]}, "'5m' or '1h'"),
    "1h after 5m": ({"system": [_cached("5m"), _cached("1h")]}, "must not come after"),
    "tool_choice names no tool": ({"tool_choice": {"type": "tool", "name": "other"}}, "no tool named"),
    "empty text block": ({"messages": [USER, {"role": "assistant", "content": [{"type": "text", "text": ""}]},
                                       USER]}, "non-empty"),
}


@pytest.fixture()
def client(server: FakeAnthropicServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="sk-test", base_url=server.url, max_retries=0)


@pytest.mark.parametrize("case", list(REFUSED))
def test_request_the_real_api_refuses_gets_a_400(server: FakeAnthropicServer, client: anthropic.Anthropic,
                                                 case: str) -> None:
    """Each rule broken gives a 400 invalid_request_error naming it, and consumes no scripted reply."""
    overrides, message = REFUSED[case]
    server.enqueue(tool_reply({}))
    request: dict[str, Any] = {"model": MODEL, "max_tokens": 4096, "tools": [TOOL], "messages": [USER], **overrides}
    with pytest.raises(anthropic.BadRequestError, match=message):
        client.messages.create(**request)
    assert server.pending == 1 and len(server.rejections) == 1


def test_valid_thinking_conversation_is_accepted(server: FakeAnthropicServer, client: anthropic.Anthropic) -> None:
    """A tool loop with thinking passed back unchanged and 1h before 5m breakpoints is answered."""
    server.enqueue(tool_reply({}, thinking="first thoughts"), tool_reply({}))
    first = client.messages.create(model=MODEL, max_tokens=4096, tools=[TOOL], thinking=THINKING,  # type: ignore[list-item]
                                   system=[_cached("1h"), _cached("5m")], messages=[USER])  # type: ignore[list-item]
    thought, call = first.content[0], first.content[1]
    assert thought.type == "thinking" and call.type == "tool_use"
    assistant = {"role": "assistant", "content": [
        {"type": "thinking", "thinking": thought.thinking, "signature": thought.signature},
        {"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]}
    client.messages.create(model=MODEL, max_tokens=4096, tools=[TOOL], thinking=THINKING,  # type: ignore[list-item]
                           messages=[USER, assistant, _result(call.id)])  # type: ignore[list-item]
    assert server.rejections == []
