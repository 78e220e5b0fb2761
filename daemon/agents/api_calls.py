"""One LLM API call as both agents make it: cost cap checked, every attempt recorded, retried with backoff.

The agents differ only in their SDK: each gives `call_with_retries` the request as a thunk, a `failure`
function that reads its SDK's exceptions into a `CallFailure` (HTTP statuses through `status_failure`), and
its token usage for `record_call`.
- 408, 409, 429 and 5xx, connection errors and timeouts are retried: the server's Retry-After when it gave
  one, else exponential backoff with jitter (`retry_wait`), never over agent.retry_wait_max_s;
- any other HTTP status is final (`AgentFatal`, with the hint the agent has for it);
- after agent.max_retries retries, `AgentError` (the next proposal tries again).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from daemon.agents.accounting import AgentCallSink, TokenUsage, check_cost_cap, cost_usd
from daemon.agents.types import Clock
from daemon.config import AgentConfig, ModelPrice
from daemon.errors import AgentError, AgentFatal
from daemon.ops.logs import get_logger
from daemon.store.records import AgentCallRecord

RETRYABLE_STATUS = frozenset({408, 409, 429})
T = TypeVar("T")

log = get_logger("autoresearch.agent")


@dataclass(frozen=True)
class CallFailure:
    """A failed attempt: what to record, and whether to give up (`fatal_hint`) or when to retry."""

    error: str
    fatal_hint: str | None = None
    retry_after: float | None = None


def status_failure(status: int, message: str, hints: Mapping[int, str], default_hint: str,
                   retry_after: Callable[[], float | None]) -> CallFailure:
    """An HTTP error status as a `CallFailure`: retried (asking `retry_after`) or final with its hint."""
    error = f"HTTP {status}: {message}"
    if status not in RETRYABLE_STATUS and status < 500:
        return CallFailure(error, fatal_hint=hints.get(status, default_hint))
    return CallFailure(error, retry_after=retry_after())


def retry_wait(config: AgentConfig, attempt: int, retry_after: float | None, rng: random.Random) -> float:
    """The server's Retry-After when it gave one, else exponential backoff with jitter (lanes do not retry in
    lockstep); never more than agent.retry_wait_max_s."""
    cap = config.retry_wait_max_s
    if retry_after is not None:
        return min(max(retry_after, 0.0), cap)
    return min(config.retry_backoff_s * 2**attempt, cap) * rng.uniform(0.5, 1.0)


def call_with_retries(config: AgentConfig, sink: AgentCallSink, clock: Clock, rng: random.Random, since: datetime,
                      api: str, send: Callable[[], T], failure: Callable[[Exception], CallFailure | None],
                      record: Callable[[float, T | None, str], None], retry_hint: str) -> T:
    """`send()`'s response, after up to agent.max_retries retries. Before each attempt the nightly cost cap is
    checked (spend since `since`); each attempt is passed to `record(latency_s, response, error)`. `failure`
    reads an exception of the SDK (None: not an API failure, raised as it is). `api` names the API in errors."""
    attempts = config.max_retries + 1
    last_error = ""
    for attempt in range(attempts):
        check_cost_cap(sink, config.nightly_cost_cap_usd, since)
        started = time.monotonic()
        try:
            response = send()
        except Exception as exc:  # read by `failure`; anything it does not know is raised unchanged
            failed = failure(exc)
            if failed is None:
                raise
            last_error = failed.error
            record(time.monotonic() - started, None, last_error)
            if failed.fatal_hint is not None:
                raise AgentFatal(f"the {api} refused the request ({last_error})", hint=failed.fatal_hint) from None
            retry_after = failed.retry_after
        else:
            record(time.monotonic() - started, response, "")
            return response
        if attempt + 1 == attempts:
            break
        wait = retry_wait(config, attempt, retry_after, rng)
        log.warning("agent_call_retry", attempt=attempt + 1, of=attempts, wait_s=round(wait, 3), error=last_error)
        clock.sleep(wait)
    raise AgentError(f"the {api} failed {attempts} times in a row; last error: {last_error}", hint=retry_hint)


def record_call(sink: AgentCallSink, provider: str, model: str, price: ModelPrice, usage: TokenUsage, latency_s: float,
                error: str, session_id: int) -> None:
    """Store one attempt (tokens, cost, latency, outcome) and log it."""
    cost = cost_usd(price, usage)
    outcome = "error" if error else "ok"
    cache_write = usage.cache_write + usage.cache_write_1h
    sink.record_agent_call(AgentCallRecord(
        provider=provider, model=model, outcome=outcome, input_tokens=usage.input, output_tokens=usage.output,
        cache_read_tokens=usage.cache_read, cache_write_tokens=cache_write, cost_usd=cost, latency_s=latency_s,
        error=error, session_id=session_id,
    ))
    log.info("agent_call", provider=provider, model=model, outcome=outcome, input_tokens=usage.input,
             output_tokens=usage.output, cache_read_tokens=usage.cache_read, cache_write_tokens=cache_write,
             cost_usd=round(cost, 6), latency_s=round(latency_s, 3))
