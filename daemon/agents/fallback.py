"""No idle GPU because of the LLM: the offline agent takes over while the LLM is capped or down.

`FallbackAgent` wraps the LLM agent. When the nightly cost cap is reached, or the API has failed for
longer than `agent.fallback_after_s`, proposals come from the offline agent (the lane keeps training);
the LLM is tried again every `agent.fallback_retry_s` and takes over again as soon as it answers (or the
cap's window has moved on). Every offline proposal made this way is recorded as an agent call with
outcome `fallback` and the reason, so metrics and the morning report show how much of the night ran
without the LLM. A fatal error (bad key, bad request) is not an outage: it still stops the session.
"""

from __future__ import annotations

import threading
from datetime import datetime

from daemon.agents.accounting import AgentCallSink
from daemon.agents.types import Agent, Clock, Proposal, ProposalContext
from daemon.errors import AgentError, AgentFatal, CostCapReached, InvalidProposal
from daemon.ops.logs import get_logger
from daemon.store.records import AgentCallRecord

FALLBACK_OUTCOME = "fallback"
log = get_logger("autoresearch.agent")


class FallbackAgent:
    """The LLM agent with the offline agent standing in during caps and outages; see the module docstring."""

    def __init__(self, primary: Agent, offline: Agent, sink: AgentCallSink, clock: Clock, *,
                 after_s: float, retry_s: float) -> None:
        self.name = primary.name
        self._primary = primary
        self._offline = offline
        self._sink = sink
        self._clock = clock
        self._after_s = after_s
        self._retry_s = retry_s
        self._lock = threading.Lock()
        self._failing_since: datetime | None = None
        self._offline_since: datetime | None = None
        self._last_try: datetime | None = None
        self._reason = ""

    @property
    def on_fallback(self) -> bool:
        with self._lock:
            return self._offline_since is not None

    def propose(self, ctx: ProposalContext) -> Proposal:
        if not self._llm_due():
            return self._fallback(ctx, self._reason)
        try:
            proposal = self._primary.propose(ctx)
        except (AgentFatal, InvalidProposal):
            raise  # not an outage: a broken set-up, or a bad reply the session asks again for
        except CostCapReached as exc:
            return self._fallback(ctx, f"cost cap: {exc}", at_once=True)
        except AgentError as exc:
            now = self._clock.now()
            with self._lock:
                self._failing_since = self._failing_since or now
                down_for = (now - self._failing_since).total_seconds()
            if down_for < self._after_s and not self.on_fallback:
                raise
            return self._fallback(ctx, f"LLM API failing for {down_for:.0f} s: {exc}", at_once=True)
        with self._lock:
            back = self._offline_since is not None
            self._failing_since = self._offline_since = None
            self._reason = ""
        if back:
            log.warning("the LLM answers again: proposals come from it again", agent=self.name)
        return proposal

    def _llm_due(self) -> bool:
        """Whether to ask the LLM now: always when not on fallback, else once per retry interval."""
        now = self._clock.now()
        with self._lock:
            if self._offline_since is None:
                return True
            if self._last_try is None or (now - self._last_try).total_seconds() >= self._retry_s:
                self._last_try = now
                return True
            return False

    def _fallback(self, ctx: ProposalContext, reason: str, at_once: bool = False) -> Proposal:
        now = self._clock.now()
        with self._lock:
            if self._offline_since is None:
                self._offline_since = now
                self._last_try = now
                log.warning("the LLM is capped or down: the offline agent proposes meanwhile", reason=reason[:300],
                            retry_every_s=self._retry_s)
            if at_once:
                self._reason = reason
        proposal = self._offline.propose(ctx)
        self._sink.record_agent_call(AgentCallRecord(provider="offline", model="offline", outcome=FALLBACK_OUTCOME,
                                                     error=self._reason[:2000], session_id=ctx.session_id))
        return Proposal(description=proposal.description,
                        hypothesis=f"[offline agent while the LLM is unavailable] {proposal.hypothesis}",
                        edits=proposal.edits, source=proposal.source)
