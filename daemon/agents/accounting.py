"""Token and dollar accounting of LLM calls, and the nightly cost cap."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from daemon.config import ModelPrice
from daemon.errors import ConfigError, CostCapReached
from daemon.store.records import AgentCallRecord

_PER_MILLION = 1_000_000
DEFAULT_CAP_WINDOW = timedelta(hours=24)


class AgentCallSink(Protocol):
    """What an agent needs from the store: write one call, sum the dollars spent since a moment."""

    def record_agent_call(self, record: AgentCallRecord) -> object: ...

    def cost_since(self, since: datetime) -> float: ...


@dataclass(frozen=True)
class TokenUsage:
    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0  # 5-minute cache writes
    cache_write_1h: int = 0


def price_for(prices: dict[str, ModelPrice], model: str) -> ModelPrice:
    """The price table entry of `model`; a model without one is a configuration error (spending must be known)."""
    try:
        return prices[model]
    except KeyError:
        raise ConfigError(
            f"agent.prices has no entry for model {model!r}",
            hint=f'add [agent.prices."{model}"] with input/output/cache_read/cache_write USD per million tokens',
        ) from None


def cost_usd(price: ModelPrice, usage: TokenUsage) -> float:
    return (
        usage.input * price.input
        + usage.output * price.output
        + usage.cache_read * price.cache_read
        + usage.cache_write * price.cache_write
        + usage.cache_write_1h * price.write_1h()
    ) / _PER_MILLION


def check_cost_cap(sink: AgentCallSink, cap_usd: float, since: datetime) -> None:
    """Raise `CostCapReached` when the spending since `since` has reached `cap_usd`."""
    spent = sink.cost_since(since)
    if spent >= cap_usd:
        raise CostCapReached(
            f"agent spending since {since.isoformat(timespec='minutes')} is ${spent:.2f}, "
            f"at or over the nightly cap of ${cap_usd:.2f}",
            hint="proposals resume in the next window; raise agent.nightly_cost_cap_usd to allow more",
        )
