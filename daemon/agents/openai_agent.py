"""The OpenAI-compatible research agent: Chat Completions with the function tool `propose_experiment`.

Speaks to OpenAI and to the servers that copy its API (vLLM, ollama, llama.cpp, LM Studio...) through the
`openai` SDK, with `agent.base_url` pointing at them. Same prompt, tool, validation, repair rounds,
retries, accounting and cost cap as the Anthropic agent: a reply that fails validation goes back as a
`tool` message answering its tool call, with the exact reason. A local server needs no key (any
placeholder is sent); its prices are whatever `agent.prices` says (0 for a free local model).
With `agent.idea_searches` > 0 it also offers `search_ideas` (daemon.agents.search_tool) and the tool choice
is `required`: a search is answered by a `tool` message and the model goes on, up to the bound; a search past
it is answered with an error and counts as a failed reply.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Any

import openai
from openai.types.chat import ChatCompletion

from daemon.agents.accounting import DEFAULT_CAP_WINDOW, AgentCallSink, TokenUsage, price_for
from daemon.agents.api_calls import CallFailure, call_with_retries, record_call, status_failure
from daemon.agents.prompt import (
    TOOL_NAME,
    build_prompt,
    packaged_prepare_source,
    prepare_interface,
    tool_definition,
)
from daemon.agents.search_tool import IdeaSearches, answer_call, is_search_reply, search_tool_definition
from daemon.agents.tool_input import proposal_from_tool_input
from daemon.agents.types import Clock, Proposal, ProposalContext
from daemon.config import AgentConfig
from daemon.errors import ConfigError, InvalidProposal
from daemon.ops.logs import get_logger

PROVIDER = "openai"
LOCAL_KEY = "not-needed"  # local servers ignore the key, the SDK wants one
_FATAL_HINTS = {
    401: "the API key was rejected: check agent.api_key or agent.api_key_file",
    403: "the key may not use this model: check the account and agent.model",
    404: "check agent.model and agent.base_url (an OpenAI-compatible server serves /v1/chat/completions)",
}

log = get_logger("autoresearch.agent")


def function_tool(tool: dict[str, Any] | None = None) -> dict[str, Any]:
    """A tool (default: propose_experiment) in the Chat Completions function format."""
    tool = tool or tool_definition()
    return {"type": "function", "function": {"name": tool["name"], "description": tool["description"],
                                             "parameters": tool["input_schema"]}}


class OpenAIAgent:
    name = PROVIDER

    def __init__(self, config: AgentConfig, sink: AgentCallSink, clock: Clock,
                 prepare_source: str | None = None, rng: random.Random | None = None) -> None:
        if config.api_key is None and config.base_url is None:
            raise ConfigError("the OpenAI agent needs an API key, or base_url of a local OpenAI-compatible server",
                              hint="set agent.api_key_file, or agent.base_url = 'http://localhost:8000/v1'")
        self._config = config
        self._price = price_for(config.prices, config.model)
        self._sink = sink
        self._clock = clock
        self._rng = rng or random.Random()
        self._prepare_text = prepare_interface(prepare_source if prepare_source is not None else packaged_prepare_source())
        key = config.api_key.get_secret_value() if config.api_key is not None else LOCAL_KEY
        self._client = openai.OpenAI(api_key=key, base_url=config.base_url, max_retries=0, timeout=config.timeout_s)

    def propose(self, ctx: ProposalContext) -> Proposal:
        searches_allowed = self._config.idea_searches
        prompt = build_prompt(ctx, self._prepare_text, ledger_tokens=self._config.ledger_tokens,
                              searches=searches_allowed)
        ctx = replace(ctx, fence_nonce=prompt.nonce)  # tool errors quote tried ideas inside the prompt's fence
        searches = IdeaSearches(ctx.ideas, prompt.nonce, searches_allowed)
        system = "\n\n".join(block["text"] for block in prompt.system)
        user = "\n\n".join(block["text"] for block in prompt.messages[0]["content"])
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        problem = ""
        failed = 0  # replies without a usable proposal; searches within their bound do not count
        while failed <= self._config.repair_rounds:
            response = self._create(messages, ctx)
            choice = response.choices[0] if response.choices else None
            message = choice.message if choice is not None else None
            calls = [call for call in (message.tool_calls or []) if call.type == "function"] if message else []
            if choice is not None and choice.finish_reason != "length" and \
                    is_search_reply([call.function.name for call in calls]):
                answers, refusal = searches.answer_all([_arguments(call.function.arguments) for call in calls])
                messages.append(_assistant(message, calls))
                messages.extend({"role": "tool", "tool_call_id": call.id, "content": answer.text}
                                for call, answer in zip(calls, answers, strict=True))
                if refusal is not None:
                    failed += 1
                    problem = refusal
                continue
            ours = next((call for call in calls if call.function.name == TOOL_NAME), None)
            try:
                if choice is None or ours is None or choice.finish_reason == "length":
                    raise InvalidProposal(_no_tool_reason(choice.finish_reason if choice else None))
                try:
                    raw = json.loads(ours.function.arguments)
                except json.JSONDecodeError as exc:
                    raise InvalidProposal(f"the {TOOL_NAME} arguments are not valid JSON ({exc.msg} at "
                                          f"character {exc.pos})") from None
                proposal = proposal_from_tool_input(raw, ctx)
            except InvalidProposal as exc:
                problem = str(exc)
                log.info("agent_proposal_invalid", round=failed, problem=problem)
                failed += 1
                messages.extend(_feedback(message, calls, problem, searches))
                continue
            return proposal
        raise InvalidProposal(
            f"the model gave no valid proposal in {self._config.repair_rounds + 1} replies; last problem: {problem}",
            hint="the next proposal starts afresh; raise agent.repair_rounds if this happens often",
        )

    def _create(self, messages: list[dict[str, Any]], ctx: ProposalContext) -> ChatCompletion:
        since = ctx.cost_since or self._clock.now() - DEFAULT_CAP_WINDOW
        request: dict[str, Any] = {
            # Always the same tools and tool choice (the server's prefix cache): a call is required, forced to
            # propose_experiment when there is no search tool.
            "model": self._config.model, "messages": messages,
            "tools": [function_tool(), function_tool(search_tool_definition())] if self._config.idea_searches else
                     [function_tool()],
            "tool_choice": "required" if self._config.idea_searches else
                           {"type": "function", "function": {"name": TOOL_NAME}},
            "max_completion_tokens": self._config.max_tokens,
        }
        if self._config.temperature != 1.0:
            request["temperature"] = self._config.temperature
        return call_with_retries(
            self._config, self._sink, self._clock, self._rng, since, "OpenAI-compatible API",
            lambda: self._client.chat.completions.create(**request), _failure,
            lambda latency_s, response, error: self._record(ctx, latency_s, response, error),
            "check the server and the network; the next proposal tries again")

    def _record(self, ctx: ProposalContext, latency_s: float, response: ChatCompletion | None = None,
                error: str = "") -> None:
        usage = TokenUsage()
        if response is not None and response.usage is not None:
            details = response.usage.prompt_tokens_details
            cached = (details.cached_tokens or 0) if details is not None else 0
            usage = TokenUsage(input=max(response.usage.prompt_tokens - cached, 0),
                               output=response.usage.completion_tokens, cache_read=cached)
        record_call(self._sink, PROVIDER, self._config.model, self._price, usage, latency_s, error, ctx.session_id)


def _failure(exc: Exception) -> CallFailure | None:
    if isinstance(exc, openai.APIStatusError):
        return status_failure(exc.status_code, exc.message, _FATAL_HINTS, "check the agent settings",
                              lambda: _seconds(exc.response.headers.get("retry-after")))
    if isinstance(exc, openai.APIConnectionError):  # also timeouts
        return CallFailure(f"{type(exc).__name__}: {exc}")
    return None


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _no_tool_reason(finish_reason: str | None) -> str:
    if finish_reason == "length":
        return "the reply was cut off at max_tokens before the tool call ended: use smaller edits"
    return f"the reply did not call {TOOL_NAME}"


def _arguments(text: str) -> object:
    """A function call's arguments as JSON (the text itself when it is not JSON: its answer says what to fix)."""
    try:
        parsed: object = json.loads(text)
    except json.JSONDecodeError:
        return text
    return parsed


def _assistant(message: Any, calls: list[Any]) -> dict[str, Any]:
    """The assistant turn as sent back, with its function calls."""
    assistant: dict[str, Any] = {"role": "assistant", "content": message.content or ""}
    if calls:
        assistant["tool_calls"] = [{"id": call.id, "type": "function", "function": {
            "name": call.function.name, "arguments": call.function.arguments}} for call in calls]
    return assistant


def _feedback(message: Any, calls: list[Any], problem: str, searches: IdeaSearches) -> list[dict[str, Any]]:
    """The assistant turn as sent back, then a tool message answering each of its tool calls (or a user turn)."""
    if message is None:
        return [{"role": "user", "content": f"Your reply was empty: {problem}. Call {TOOL_NAME} now."}]
    if calls:
        answers = [{"role": "tool", "tool_call_id": call.id,
                    "content": answer_call(call.function.name, _arguments(call.function.arguments), searches,
                                           problem).text} for call in calls]
        return [_assistant(message, calls), *answers]
    return [_assistant(message, calls),
            {"role": "user", "content": f"Your reply was not usable: {problem}. Call {TOOL_NAME} now."}]
