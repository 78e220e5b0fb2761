"""The Anthropic research agent: Messages API with the tool `propose_experiment`, and extended thinking.

Beside it the model may call `search_ideas` (daemon.agents.search_tool) up to `agent.idea_searches` times per
proposal: each call is answered with a tool_result in the next user turn and the model goes on; a search past
the bound is answered with an error and counts as a failed reply, like a repair.

With thinking on (the default) the model reasons before it edits: the tool choice is `auto` (the API
refuses a forced tool with thinking) and a reply without the tool call is sent back asking for it;
thinking blocks go back unchanged in the repair and search turns, as the API requires. With thinking off
a tool call is required (`any`; propose_experiment forced when there is no search tool). The tools and the
tool choice are the same in every request (a change would miss the cache). The stable prefix is cached with the configured lifetime (1 hour by default: runs are
minutes apart, so the 5-minute cache would mostly miss).

Retries are ours (the SDK's are switched off) so that every attempt is counted, costed, capped and
waits through the clock seam. A reply that fails validation goes back to the model as an error tool
result with the exact reason, up to `agent.repair_rounds` times.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import replace
from email.utils import parsedate_to_datetime
from typing import Any

import anthropic
from anthropic.types import Message

from daemon.agents.accounting import DEFAULT_CAP_WINDOW, AgentCallSink, TokenUsage, price_for
from daemon.agents.api_calls import CallFailure, call_with_retries, record_call, status_failure
from daemon.agents.prompt import (
    TOOL_NAME,
    build_prompt,
    packaged_prepare_source,
    prepare_interface,
    tool_definition,
)
from daemon.agents.search_tool import (
    IdeaSearches,
    ToolAnswer,
    answer_call,
    is_search_reply,
    search_tool_definition,
)
from daemon.agents.tool_input import proposal_from_tool_input
from daemon.agents.types import Clock, Proposal, ProposalContext
from daemon.config import AgentConfig
from daemon.errors import ConfigError, InvalidProposal
from daemon.ops.logs import get_logger

PROVIDER = "anthropic"
_API_DEFAULT_TEMPERATURE = 1.0
_FATAL_HINTS = {
    401: "the API key was rejected: check agent.api_key or agent.api_key_file",
    403: "the API key may not use this model or endpoint: check the account's permissions and agent.model",
    404: "check agent.model and agent.base_url",
}

log = get_logger("autoresearch.agent")


class AnthropicAgent:
    name = PROVIDER

    def __init__(self, config: AgentConfig, sink: AgentCallSink, clock: Clock,
                 prepare_source: str | None = None, rng: random.Random | None = None) -> None:
        if config.api_key is None:
            raise ConfigError("the Anthropic agent needs an API key",
                              hint="set agent.api_key_file (or AUTORESEARCH_AGENT__API_KEY), or use provider = 'offline'")
        self._config = config
        self._price = price_for(config.prices, config.model)
        self._sink = sink
        self._clock = clock
        self._rng = rng or random.Random()
        self._prepare_text = prepare_interface(prepare_source if prepare_source is not None else packaged_prepare_source())
        self._client = anthropic.Anthropic(
            api_key=config.api_key.get_secret_value(),
            base_url=config.base_url,
            max_retries=0,
            timeout=config.timeout_s,
        )

    def propose(self, ctx: ProposalContext) -> Proposal:
        searches_allowed = self._config.idea_searches
        prompt = build_prompt(ctx, self._prepare_text, cache_ttl=self._config.cache_ttl,
                              ledger_tokens=self._config.ledger_tokens, searches=searches_allowed)
        ctx = replace(ctx, fence_nonce=prompt.nonce)  # tool errors quote tried ideas inside the prompt's fence
        searches = IdeaSearches(ctx.ideas, prompt.nonce, searches_allowed)
        messages = list(prompt.messages)
        problem = ""
        failed = 0  # replies without a usable proposal; searches within their bound do not count
        while failed <= self._config.repair_rounds:
            response = self._create(prompt.system, messages, ctx)
            calls = [block for block in response.content if block.type == "tool_use"]
            if response.stop_reason != "max_tokens" and is_search_reply([call.name for call in calls]):
                answers, refusal = searches.answer_all([call.input for call in calls])
                messages.append({"role": "assistant", "content": _as_params(response)})
                messages.append({"role": "user", "content": [_result(call.id, answer)
                                                             for call, answer in zip(calls, answers, strict=True)]})
                if refusal is not None:
                    failed += 1
                    problem = refusal
                continue
            tool_use = next((call for call in calls if call.name == TOOL_NAME), None)
            try:
                if tool_use is None or response.stop_reason == "max_tokens":
                    raise InvalidProposal(_no_tool_reason(response))
                proposal = proposal_from_tool_input(tool_use.input, ctx)
            except InvalidProposal as exc:
                problem = str(exc)
                log.info("agent_proposal_invalid", round=failed, problem=problem)
                failed += 1
                messages.append({"role": "assistant", "content": _as_params(response)})
                messages.append({"role": "user", "content": _feedback(response, problem, searches)})
                continue
            return proposal
        raise InvalidProposal(
            f"the model gave no valid proposal in {self._config.repair_rounds + 1} replies; last problem: {problem}",
            hint="the next proposal starts afresh; raise agent.repair_rounds if this happens often",
        )

    def _create(self, system: list[dict[str, Any]], messages: list[dict[str, Any]], ctx: ProposalContext) -> Message:
        """One Messages API call with our retries; every attempt is recorded and checked against the cap."""
        since = ctx.cost_since or self._clock.now() - DEFAULT_CAP_WINDOW
        request: dict[str, Any] = {
            "model": self._config.model,
            "max_tokens": self._config.max_tokens,
            "system": system,
            # Always the same tools in the same order: they open the cached prefix.
            "tools": [tool_definition(), search_tool_definition()] if self._config.idea_searches else
                     [tool_definition()],
            # Without thinking: a tool call is required; forced to propose_experiment unless searches are allowed.
            "tool_choice": {"type": "any"} if self._config.idea_searches else {"type": "tool", "name": TOOL_NAME},
            "messages": messages,
        }
        if self._config.thinking == "enabled":
            request["thinking"] = {"type": "enabled", "budget_tokens": self._config.thinking_budget_tokens}
        elif self._config.thinking == "adaptive":
            request["thinking"] = {"type": "adaptive"}
        if self._config.thinking != "off":
            request["tool_choice"] = {"type": "auto"}  # a forced tool choice is refused with thinking
        elif self._config.temperature != _API_DEFAULT_TEMPERATURE:
            # This SDK no longer has a temperature parameter (newer models fix it); send it only when asked for.
            request["extra_body"] = {"temperature": self._config.temperature}
        return call_with_retries(
            self._config, self._sink, self._clock, self._rng, since, "Anthropic API",
            lambda: self._client.messages.create(**request), self._failure,
            lambda latency_s, response, error: self._record(ctx, latency_s, response, error),
            "check the network and the API status; the next proposal tries again")

    def _failure(self, exc: Exception) -> CallFailure | None:
        if isinstance(exc, anthropic.APIStatusError):
            return status_failure(exc.status_code, exc.message, _FATAL_HINTS, "check the agent settings and the request",
                                  lambda: self._retry_after(exc.response.headers))
        if isinstance(exc, anthropic.APIConnectionError):  # also timeouts
            return CallFailure(f"{type(exc).__name__}: {exc}")
        return None

    def _retry_after(self, headers: Mapping[str, str]) -> float | None:
        if (millis := headers.get("retry-after-ms")) is not None:
            try:
                return float(millis) / 1000
            except ValueError:
                pass
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return float(value)
        except ValueError:
            pass
        try:
            return (parsedate_to_datetime(value) - self._clock.now()).total_seconds()
        except (TypeError, ValueError):
            return None

    def _record(self, ctx: ProposalContext, latency_s: float, response: Message | None = None, error: str = "") -> None:
        usage = TokenUsage()
        if response is not None:
            written = response.usage.cache_creation_input_tokens or 0
            split = response.usage.cache_creation
            written_1h = (split.ephemeral_1h_input_tokens or 0) if split is not None else 0
            usage = TokenUsage(
                input=response.usage.input_tokens,
                output=response.usage.output_tokens,
                cache_read=response.usage.cache_read_input_tokens or 0,
                cache_write=max(written - written_1h, 0),
                cache_write_1h=written_1h,
            )
        record_call(self._sink, PROVIDER, self._config.model, self._price, usage, latency_s, error, ctx.session_id)


def _feedback(response: Message, problem: str, searches: IdeaSearches) -> Any:
    """The user turn answering an unusable reply: a tool_result for every tool_use (the API requires it)."""
    results = [_result(block.id, answer_call(block.name, block.input, searches, problem))
               for block in response.content if block.type == "tool_use"]
    if results:
        return results
    return f"Your reply was not usable: {problem}. Call {TOOL_NAME} now."


def _result(tool_use_id: str, answer: ToolAnswer) -> dict[str, Any]:
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_use_id, "content": answer.text}
    if answer.is_error:
        result["is_error"] = True
    return result


def _no_tool_reason(response: Message) -> str:
    if response.stop_reason == "max_tokens":
        return "the reply was cut off at max_tokens before the tool call ended: use smaller edits"
    return f"the reply did not call {TOOL_NAME}"


def _as_params(response: Message) -> list[dict[str, Any]]:
    """The reply's text and tool-use blocks as request parameters, to send the conversation back."""
    blocks: list[dict[str, Any]] = []
    for block in response.content:
        if block.type == "thinking":  # unchanged, signature included: the API verifies it
            blocks.append({"type": "thinking", "thinking": block.thinking, "signature": block.signature})
        elif block.type == "redacted_thinking":
            blocks.append({"type": "redacted_thinking", "data": block.data})
        elif block.type == "text" and block.text.strip():  # the API refuses empty text blocks
            blocks.append({"type": "text", "text": block.text})
        elif block.type == "tool_use":
            blocks.append({"type": "tool_use", "id": block.id, "name": block.name, "input": block.input})
    return blocks or [{"type": "text", "text": "(empty reply)"}]
