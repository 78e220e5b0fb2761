"""Research agents: they read the best `train.py` and the night's history and propose the next experiment.

Three providers share one interface (`Agent.propose`): the Anthropic agent (Messages API with tool use
and extended thinking), the OpenAI-compatible agent (Chat Completions with a function tool: OpenAI, vLLM,
ollama) and the offline agent (AST-level hyperparameter search, no LLM, the embedded default). Every proposal
has already been applied to the best source and validated (`daemon.agents.edits`) when it is returned.
Types: `types` (the proposal, the context, the interface; re-exported here). Prompt parts: `prompt` (layout, cache breakpoints), `ledger_text` (the ledger and idea memory as text),
`fences` (untrusted text as data under the line's secret nonce), `ideas` (the idea index and its matching),
`idea_search` and `search_tool` (the agent's search of the idea memory, the `search_ideas` tool).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.agents.types import (
    Agent,
    ChangeEntry,
    Clock,
    CrashEntry,
    CrashInfo,
    Edit,
    HistoryItem,
    InFlight,
    LedgerView,
    Proposal,
    ProposalContext,
    RunEntry,
    SystemClock,
)

if TYPE_CHECKING:
    from daemon.agents.accounting import AgentCallSink
    from daemon.config import Settings

__all__ = ["Agent", "ChangeEntry", "Clock", "CrashEntry", "CrashInfo", "Edit", "HistoryItem", "InFlight", "LedgerView", "Proposal", "ProposalContext", "RunEntry", "SystemClock", "make_agent"]


def make_agent(settings: Settings, store: AgentCallSink, clock: Clock) -> Agent:
    """The agent that `settings.agent.provider` selects ("auto": Anthropic when an API key is set).

    An LLM agent comes wrapped in the offline fallback (`daemon.agents.fallback`) unless `agent.fallback`
    is "none".
    """
    # Imported here so that the offline default never loads an LLM SDK.
    from daemon.agents.offline import OfflineAgent

    config = settings.agent
    llm: Agent
    if config.resolved_provider() == "anthropic":
        from daemon.agents.anthropic_agent import AnthropicAgent

        llm = AnthropicAgent(config, store, clock)
    elif config.resolved_provider() == "openai":
        from daemon.agents.openai_agent import OpenAIAgent

        llm = OpenAIAgent(config, store, clock)
    else:
        return OfflineAgent()
    if config.fallback == "none":
        return llm
    from daemon.agents.fallback import FallbackAgent

    return FallbackAgent(llm, OfflineAgent(), store, clock, after_s=config.fallback_after_s,
                         retry_s=config.fallback_retry_s)
