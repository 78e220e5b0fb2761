"""The agents' call sink in the runtime: stores every call and keeps the cost-tonight gauge on the window."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from daemon.ops.metrics import Metrics
from daemon.service.runtime import MeteredCallSink
from daemon.store import open_store
from daemon.store.records import AgentCallRecord


def test_cost_gauge_counts_from_the_window_the_agent_checks(tmp_path: Path) -> None:
    """After the agent checks the cap against a new window's start, the gauge counts only that window's calls."""
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.upgrade()
    metrics = Metrics()
    try:
        process_start = datetime.now(timezone.utc) - timedelta(hours=1)
        sink = MeteredCallSink(store, metrics, process_start, cap_usd=20.0)
        sink.record_agent_call(AgentCallRecord("anthropic", "m", cost_usd=3.0))  # last night
        assert metrics.registry.get_sample_value("autoresearch_cost_tonight_usd") == 3.0
        tonight = datetime.now(timezone.utc)
        assert sink.cost_since(tonight) == 0.0
        sink.record_agent_call(AgentCallRecord("anthropic", "m", cost_usd=0.5))
        assert metrics.registry.get_sample_value("autoresearch_cost_tonight_usd") == 0.5
        assert metrics.registry.get_sample_value("autoresearch_cost_cap_usd") == 20.0
    finally:
        store.close()
