"""Where people look: the re-test's night gain on the status page, in status JSON and in the webhook's text."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from daemon.ops.morning import summary_text
from daemon.ops.retest_report import night_headline
from daemon.ops.statusdata import session_data
from daemon.ops.statuspage import LiveState, render_status_page
from daemon.research import SessionSummary
from daemon.research.retest import comparisons
from daemon.store import open_store
from daemon.store.sql import Store

NOW = datetime(2026, 11, 5, 7, 30, tzinfo=timezone.utc)
START, END = [1.300, 1.310, 1.295], [1.290, 1.299, 1.286]  # paired by seed: b - a = -0.010, -0.011, -0.009


def measured(store: Store, session_id: int, kind: str, source: str, val_bpb: float, parent_id: int | None) -> int:
    created = store.create_experiment(session_id, kind, source, parent_id=parent_id, description=kind)
    store.claim_next(session_id, "night-owner", "gpu0", None, 60.0)
    store.transition(created.id, "running", "evaluating")
    store.transition(created.id, "evaluating", "kept", val_bpb=val_bpb)
    return created.id


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'status.db'}")
    opened.upgrade()
    yield opened
    opened.close()


@pytest.fixture()
def retested(store: Store) -> int:
    """A night with one keep, re-tested on three pairs (stored as the re-test stores them)."""
    session = store.create_session("night", "window", "program", {"retest": {"confidence": 0.95}})
    base = measured(store, session.id, "baseline", "a = 1\n", 1.30, None)
    best = measured(store, session.id, "candidate", "a = 2\n", 1.29, base)
    retest = store.create_retest(session.id, "night", base_id=base, best_id=best, budget_s=300.0, k=3)
    for seed, (a, b) in enumerate(zip(START, END, strict=True), start=1_000_001_000):
        store.add_retest_run(retest.id, "a", base, seed, "measured", a)
        store.add_retest_run(retest.id, "b", best, seed, "measured", b)
    store.finish_retest(retest.id, "done")
    return session.id


def test_status_page_shows_the_night_gain(store: Store, retested: int) -> None:
    """The page's summary carries the re-test's 'night gain: Δ ± ...: held' line."""
    state = LiveState()
    state.set_session(retested)
    page = render_status_page(store, state, now=NOW)
    assert '<p id="retest">night gain: Δ -0.010000 ± ' in page and "3 fresh seeds" in page and ": held</p>" in page


def test_status_json_carries_the_retest_numbers(store: Store, retested: int) -> None:
    """status JSON: the night's delta, half-width, pairs and verdict, and the keeps held ratio."""
    data = session_data(store, retested)["retest"]
    assert data["night"]["delta_bpb"] == pytest.approx(-0.010) and data["night"]["pairs"] == 3
    assert data["night"]["verdict"] == "held" and data["night"]["half_width_bpb"] > 0
    assert data["keeps_held_ratio"] == 1.0 and data["headline"].startswith("night gain: Δ -0.010000")


def test_status_without_a_retest_says_so(store: Store) -> None:
    """A session no re-test ran for says 'not re-tested' instead of showing no line at all."""
    session = store.create_session("night", "window", "program", {})
    state = LiveState()
    state.set_session(session.id)
    assert "night gain: not re-tested" in render_status_page(store, state, now=NOW)
    assert session_data(store, session.id)["retest"]["night"] is None


def test_webhook_text_leads_with_the_night_gain(store: Store, retested: int) -> None:
    """The webhook paragraph names the re-tested gain right after the session's status."""
    headline = night_headline(comparisons(store, [retested]))
    text = summary_text(SessionSummary(retested, "night", "window ended", "completed", {"kept": 2}, 1.30, 1.29),
                        None, headline)
    assert "window ended. night gain: Δ -0.010000 ± " in text


def test_the_retests_numbers_reach_the_metrics(store: Store, retested: int) -> None:
    """After a re-test the daemon exports its night delta and the share of keeps that held."""
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from daemon.ops.metrics import Metrics
    from daemon.service.retesting import publish

    metrics = Metrics()
    publish(SimpleNamespace(metrics=metrics, store=store), retested, comparisons(store, [retested]))  # type: ignore[arg-type]
    text = generate_latest(metrics.registry).decode()
    assert "autoresearch_retest_gain_bpb -0.01" in text and "autoresearch_keeps_held_ratio 1.0" in text
