"""The built-in status page: content and escaping, then rendered by a real headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from daemon.ops.http import DaemonHTTPServer, Heartbeat, start_http_server
from daemon.ops.metrics import Metrics
from daemon.ops.statuspage import LiveState, render_status_page
from daemon.service.scheduler import Window
from daemon.store import open_store

REPO_ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 5, 3, 0, tzinfo=timezone.utc)
HOSTILE = "<img src=x onerror=\"document.title='pwned'\">"


@pytest.fixture(scope="module")
def live_state(filled_session) -> LiveState:
    state = LiveState()
    state.set_window(Window("weeknights", datetime(2026, 11, 4, 22, 0, tzinfo=timezone.utc),
                            datetime(2026, 11, 5, 7, 0, tzinfo=timezone.utc)))
    state.set_session(filled_session.session_id)
    state.set_lane("gpu0", "GPU-0000", "running", experiment_id=11, description=HOSTILE,
                   since=datetime(2026, 11, 5, 2, 55, tzinfo=timezone.utc))
    state.set_lane("gpu1", "GPU-0001", "paused", reason="foreign process 999",
                   since=datetime(2026, 11, 5, 2, 30, tzinfo=timezone.utc))
    return state


@pytest.fixture(scope="module")
def page(filled_session, live_state: LiveState) -> str:
    return render_status_page(filled_session.store, live_state, now=NOW)


def test_page_shows_window_and_lanes(page: str) -> None:
    """The open window with its remaining time and both lanes appear."""
    assert "weeknights" in page and "4 h 00 min left" in page
    assert 'class="lane running"' in page and 'class="lane paused"' in page
    assert "foreign process 999" in page


def test_lane_durations_are_shown_and_never_negative(filled_session, live_state: LiveState) -> None:
    """Lanes show how long they are in their state; a state stamped after the page's clock shows 0 min."""
    page = render_status_page(filled_session.store, live_state, now=NOW)
    assert "<td>5 min</td>" in page and "<td>30 min</td>" in page
    earlier = render_status_page(filled_session.store, live_state, now=datetime(2026, 11, 5, 2, 0, tzinfo=timezone.utc))
    assert "<td>0 min</td>" in earlier and not re.search(r"<td>-\d+ min</td>", earlier)


def test_page_lists_every_experiment_of_the_session(page: str) -> None:
    """One table row per experiment, with status and val_bpb."""
    rows = re.findall(r'<tr class="experiment" data-id="(\d+)" data-status="(\w+)"', page)
    assert len(rows) == 10
    assert ("9", "kept") in rows
    assert "1.165000" in page


def test_page_shows_best_and_its_diff(page: str) -> None:
    """The best value, its delta vs baseline and the escaped best diff are on the page."""
    assert "best <b>1.165000</b> (-0.035000 vs baseline)" in page
    assert '<pre id="best-diff">-LR = 0.04\n+LR = 0.03\n-DEPTH = 8\n+DEPTH = 10\n```\n</pre>' in page


def test_page_chart_has_staircase_and_marks(page: str) -> None:
    """The inline SVG holds a staircase, three kept points, and two failure marks."""
    assert '<path class="staircase"' in page
    assert page.count('class="point kept"') == 3
    assert page.count('class="point failed"') == 2


def test_page_escapes_llm_text(page: str) -> None:
    """Descriptions with markup are shown as text, never as elements."""
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;" in page and "&lt;img src=x" in page


def test_page_without_any_session(tmp_path: Path) -> None:
    """An empty database renders a page that says no session has run."""
    store = open_store(f"sqlite:///{tmp_path / 'empty.db'}")
    store.upgrade()
    try:
        html = render_status_page(store, LiveState(), now=NOW)
    finally:
        store.close()
    assert "No research session has run yet." in html
    assert "none scheduled" in html


def test_unknown_lane_state_is_refused() -> None:
    """A typo in a lane state raises a ValueError listing the valid states."""
    with pytest.raises(ValueError, match="running"):
        LiveState().set_lane("gpu0", None, "runing")


@pytest.fixture(scope="module")
def served_page(filled_session, live_state: LiveState) -> Iterator[DaemonHTTPServer]:
    heartbeat = Heartbeat(60)
    heartbeat.beat()
    server = start_http_server("127.0.0.1", 0, Metrics().registry, db_ping=filled_session.store.ping,
                               heartbeat=heartbeat,
                               status_page=lambda: render_status_page(filled_session.store, live_state, now=NOW))
    yield server
    server.close()


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.chromium
def test_chromium_renders_the_session_rows(served_page: DaemonHTTPServer, tmp_path: Path) -> None:
    """Headless Chromium's DOM holds every experiment row, the SVG chart, and no injected element."""
    result = chromium(tmp_path, "--dump-dom", served_page.url + "/")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert len(re.findall(r'<tr class="experiment"', dom)) == 10
    assert '<svg id="chart"' in dom
    assert "<title>autoresearch status</title>" in dom  # onerror never ran to rename it
    assert "<img" not in dom


@pytest.mark.chromium
def test_chromium_screenshot_is_saved_as_artifact(served_page: DaemonHTTPServer, tmp_path: Path) -> None:
    """A full-page screenshot is written under test-artifacts/ for a person to look at."""
    artifacts = REPO_ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / "status-page.png"
    shot.unlink(missing_ok=True)
    result = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1700", "--hide-scrollbars",
                      served_page.url + "/")
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
