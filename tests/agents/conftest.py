"""Fixtures of the agent tests: the fake API server and agents wired to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from daemon.agents.anthropic_agent import AnthropicAgent
from daemon.agents.openai_agent import OpenAIAgent
from daemon.config import AgentConfig, ModelPrice
from tests.agents.support import MemorySink, RecordingClock
from tests.fakes.anthropic_server import FakeAnthropicServer
from tests.fakes.openai_server import MODEL, FakeOpenAIServer

OPENAI_PRICES = {MODEL: ModelPrice(input=2.0, output=8.0, cache_read=0.5)}


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


@pytest.fixture()
def chat() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture()
def make_openai(chat: FakeOpenAIServer, sink: MemorySink, clock: RecordingClock) -> Callable[..., OpenAIAgent]:
    """An OpenAIAgent on the fake Chat Completions server; keyword arguments override AgentConfig fields."""

    def _make(**overrides: Any) -> OpenAIAgent:
        fields: dict[str, Any] = {"provider": "openai", "base_url": chat.url, "model": MODEL, "prices": OPENAI_PRICES,
                                  "max_retries": 2, "retry_backoff_s": 0.01, "repair_rounds": 2, "timeout_s": 5.0}
        fields.update(overrides)
        return OpenAIAgent(AgentConfig(**fields), sink, clock)

    return _make
