"""Request rules of the real Anthropic Messages API that the fake server enforces (each answered with a 400).

Written from the API's documentation of messages, tool use, extended thinking and prompt caching, so a
request our agent builds that the real API would refuse fails the tests too:

- model, max_tokens (>= 1) and a non-empty messages list; roles alternate, starting with `user`;
- every `tool_use` of an assistant turn is answered by a `tool_result` (same id) at the start of the next
  user turn, and a `tool_result` answers only a `tool_use` of the turn just before it;
- `tool_choice` of type `tool` names a defined tool; tools have a valid name and an object input schema;
- extended thinking (`thinking: {type: enabled}`): budget_tokens >= 1024 and < max_tokens; no forced tool
  choice (`any` / `tool`); temperature unset or 1; no top_k; an assistant turn with tool_use starts with a
  thinking block; thinking blocks come back unchanged (their signature matches the text);
- prompt caching: at most 4 `cache_control` breakpoints; type `ephemeral`; ttl `5m` or `1h`; in the order
  tools, system, messages, a `1h` breakpoint never comes after a `5m` one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

MAX_BREAKPOINTS = 4
MIN_THINKING_BUDGET = 1024
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")


class RequestRejected(Exception):
    """The message of the 400 invalid_request_error the real API would answer."""


def check_request(body: Any, signatures: dict[str, str]) -> None:
    """Raise `RequestRejected` when the real API would refuse `body`; `signatures` maps signature -> thinking text."""
    if not isinstance(body, dict):
        raise RequestRejected("the request body must be a JSON object")
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            raise RequestRejected(f"{name}: Field required")
    if not isinstance(body["max_tokens"], int) or body["max_tokens"] < 1:
        raise RequestRejected("max_tokens: must be a positive integer")
    tools = body.get("tools") or []
    _check_tools(tools, body.get("tool_choice"))
    thinking = body.get("thinking")
    thinking_on = isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")
    if thinking_on:
        _check_thinking_config(body)
    _check_messages(body["messages"], thinking_on, signatures)
    _check_cache_control(body)


def _check_tools(tools: list[Any], tool_choice: Any) -> None:
    names = set()
    for tool in tools:
        if not isinstance(tool, dict) or not _TOOL_NAME.match(str(tool.get("name", ""))):
            raise RequestRejected(f"tools: invalid tool name {tool.get('name') if isinstance(tool, dict) else tool!r}")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise RequestRejected(f"tools.{tool['name']}.input_schema: type must be 'object'")
        names.add(tool["name"])
    if tool_choice is None:
        return
    kind = tool_choice.get("type") if isinstance(tool_choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise RequestRejected(f"tool_choice.type: unknown value {kind!r}")
    if kind in ("any", "tool") and not tools:
        raise RequestRejected("tool_choice: a tool choice needs tools")
    if kind == "tool" and tool_choice.get("name") not in names:
        raise RequestRejected(f"tool_choice.name: no tool named {tool_choice.get('name')!r}")


def _check_thinking_config(body: dict[str, Any]) -> None:
    thinking = body["thinking"]
    if thinking["type"] == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or budget < MIN_THINKING_BUDGET:
            raise RequestRejected(f"thinking.enabled.budget_tokens: Input should be greater than or equal to "
                                  f"{MIN_THINKING_BUDGET}")
        if budget >= body["max_tokens"]:
            raise RequestRejected("`max_tokens` must be greater than `thinking.budget_tokens`")
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
        raise RequestRejected("Thinking may not be enabled when tool_choice forces tool use.")
    if "temperature" in body and body["temperature"] != 1:
        raise RequestRejected("`temperature` may only be set to 1 when thinking is enabled.")
    if "top_k" in body:
        raise RequestRejected("`top_k` is not supported when thinking is enabled.")


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(block, dict) for block in content):
        raise RequestRejected("messages.content: must be a string or a list of content blocks")
    return content


def _check_messages(messages: Any, thinking_on: bool, signatures: dict[str, str]) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestRejected("messages: at least one message is required")
    pending: set[str] = set()  # tool_use ids of the previous assistant turn
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise RequestRejected(f"messages.{index}.role: roles must alternate between user and assistant, "
                                  f"starting with user (found {role!r})")
        blocks = _blocks(message.get("content"))
        if not blocks:
            raise RequestRejected(f"messages.{index}: content must not be empty")
        if role == "user":
            _check_tool_results(index, blocks, pending)
            pending = set()
        else:
            pending = _check_assistant(index, blocks, thinking_on, signatures, last=index == len(messages) - 1)


def _check_tool_results(index: int, blocks: list[dict[str, Any]], pending: set[str]) -> None:
    results = [block for block in blocks if block.get("type") == "tool_result"]
    answered = {str(block.get("tool_use_id")) for block in results}
    unknown = answered - pending
    if unknown:
        raise RequestRejected(f"messages.{index}.content: unexpected `tool_use_id` found in `tool_result` blocks: "
                              f"{sorted(unknown)}. Each `tool_result` block must have a corresponding `tool_use` "
                              "block in the previous message.")
    if pending - answered:
        raise RequestRejected(f"messages.{index}: `tool_use` ids were found without `tool_result` blocks immediately "
                              f"after: {sorted(pending - answered)}. Each `tool_use` block must have a corresponding "
                              "`tool_result` block in the next message.")
    if results and any(block.get("type") != "tool_result" for block in blocks[:len(results)]):
        raise RequestRejected(f"messages.{index}.content: `tool_result` blocks must come first in the message")


def _check_assistant(index: int, blocks: list[dict[str, Any]], thinking_on: bool, signatures: dict[str, str],
                     last: bool) -> set[str]:
    tool_ids: set[str] = set()
    for block in blocks:
        kind = block.get("type")
        if kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("input"), dict):
                raise RequestRejected(f"messages.{index}.content: tool_use needs an id and an object input")
            tool_ids.add(block["id"])
        elif kind == "thinking":
            if signatures.get(str(block.get("signature"))) != block.get("thinking"):
                raise RequestRejected(f"messages.{index}.content: Invalid `signature` in `thinking` block")
        elif kind == "redacted_thinking":
            if not isinstance(block.get("data"), str):
                raise RequestRejected(f"messages.{index}.content: redacted_thinking needs its data")
        elif kind == "text":
            if not str(block.get("text", "")).strip():
                raise RequestRejected(f"messages.{index}.content: text content blocks must be non-empty")
        else:
            raise RequestRejected(f"messages.{index}.content: block type {kind!r} is not allowed here")
    if thinking_on and tool_ids and blocks[0].get("type") not in ("thinking", "redacted_thinking"):
        raise RequestRejected(f"messages.{index}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
                              f"{blocks[0].get('type')!r}. When `thinking` is enabled, an assistant message with "
                              "tool use must start with a thinking block.")
    if last and thinking_on:
        raise RequestRejected("a final assistant message (prefill) is not supported when thinking is enabled")
    return tool_ids


def breakpoints(body: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every cache_control in the order the API reads the prompt: tools, system, messages."""
    for tool in body.get("tools") or []:
        if isinstance(tool, dict) and "cache_control" in tool:
            yield f"tools.{tool.get('name')}", tool["cache_control"]
    system = body.get("system")
    if isinstance(system, list):
        for number, block in enumerate(system):
            if isinstance(block, dict) and "cache_control" in block:
                yield f"system.{number}", block["cache_control"]
    for index, message in enumerate(body.get("messages") or []):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for number, block in enumerate(content):
                if isinstance(block, dict) and "cache_control" in block:
                    yield f"messages.{index}.content.{number}", block["cache_control"]


def _check_cache_control(body: dict[str, Any]) -> None:
    found = list(breakpoints(body))
    if len(found) > MAX_BREAKPOINTS:
        raise RequestRejected(f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
                              f"Found {len(found)}.")
    seen_5m = False
    for where, control in found:
        if not isinstance(control, dict) or control.get("type") != "ephemeral":
            raise RequestRejected(f"{where}.cache_control.type: Input should be 'ephemeral'")
        ttl = control.get("ttl", "5m")
        if ttl not in ("5m", "1h"):
            raise RequestRejected(f"{where}.cache_control.ttl: Input should be '5m' or '1h'")
        if ttl == "1h" and seen_5m:
            raise RequestRejected("a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block")
        seen_5m = seen_5m or ttl == "5m"
