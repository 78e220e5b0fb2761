"""make_agent's provider choice and the agents' use of the real store for accounting."""

from __future__ import annotations

from pathlib import Path

from daemon.agents import make_agent
from daemon.config import Settings
from daemon.store import open_store
from tests.agents.support import MemorySink, RecordingClock, make_context
from tests.fakes.anthropic_server import FakeAnthropicServer, tool_reply


def test_offline_without_api_key() -> None:
    """With no API key, "auto" picks the offline agent."""
    agent = make_agent(Settings(), MemorySink(), RecordingClock())
    assert agent.name == "offline"


def test_anthropic_with_api_key() -> None:
    """With an API key, "auto" picks the Anthropic agent."""
    agent = make_agent(Settings(agent={"api_key": "sk-test"}), MemorySink(), RecordingClock())
    assert agent.name == "anthropic"


def test_calls_are_recorded_in_the_real_store(tmp_path: Path, server: FakeAnthropicServer) -> None:
    """An Anthropic call lands in the SQLite store's agent calls and counts toward cost_since."""
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    store.upgrade()
    session = store.create_session("night", "manual", "program", {})
    settings = Settings(agent={"api_key": "sk-test", "base_url": server.url, "model": "claude-haiku-5-5"})
    clock = RecordingClock()
    server.enqueue(tool_reply({"description": "raise MATRIX_LR 0.02 -> 0.03", "hypothesis": "h",
                               "edits": [{"search": "MATRIX_LR = 0.02", "replace": "MATRIX_LR = 0.03"}]},
                              usage={"input_tokens": 1000, "output_tokens": 1000}))
    start = clock.now()
    make_agent(settings, store, clock).propose(make_context(session_id=session.id))
    assert store.cost_since(start) == (1000 * 1.0 + 1000 * 5.0) / 1e6
