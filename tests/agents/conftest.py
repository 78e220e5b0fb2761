"""Fixtures of the agent tests: the fake API server and agents wired to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from daemon.agents.anthropic_agent import AnthropicAgent
from daemon.config import AgentConfig
from tests.agents.support import MemorySink, RecordingClock
from tests.fakes.anthropic_server import FakeAnthropicServer


@pytest.fixture()
def clock() -> RecordingClock:
    return RecordingClock()


@pytest.fixture()
def sink() -> MemorySink:
    return MemorySink()


@pytest.fixture()
def server() -> Iterator[FakeAnthropicServer]:
    with FakeAnthropicServer() as fake:
        yield fake


@pytest.fixture()
def make_anthropic(server: FakeAnthropicServer, sink: MemorySink,
                   clock: RecordingClock) -> Callable[..., AnthropicAgent]:
    """An AnthropicAgent on the fake server; keyword arguments override AgentConfig fields."""

    def _make(**overrides: Any) -> AnthropicAgent:
        fields: dict[str, Any] = {"provider": "anthropic", "api_key": "sk-test", "base_url": server.url,
                                  "max_retries": 2, "retry_backoff_s": 0.01, "repair_rounds": 2, "timeout_s": 5.0}
        fields.update(overrides)
        return AnthropicAgent(AgentConfig(**fields), sink, clock)

    return _make
