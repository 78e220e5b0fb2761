"""The built-in status page (`/` of the daemon's HTTP server), for labs without Grafana.

Plain server-side HTML with an inline SVG chart; read-only; shows no secrets (no config, no keys, no
sources, no logs). Every piece of text from the database is escaped: descriptions are LLM-written.

The research loop keeps a `LiveState` up to date (window, lanes, current session); the page reads it
together with the Store on every request:

    state = LiveState()
    state.set_window(window)                              # or None when it closes
    state.set_session(session.id)
    state.set_lane("gpu0", gpu_uuid, "running", experiment_id=17, description="lower LR")
    state.set_lane("gpu0", gpu_uuid, "idle")
    page = lambda: render_status_page(store, state)       # the `status_page` callable of daemon.ops.http
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape

from daemon.ops.report import ChartPoint, val_bpb_series
from daemon.service.scheduler import Window
from daemon.store import ExperimentRecord, Store

LANE_STATES = ("idle", "running", "evaluating", "paused", "stopped")
_TABLE_ROWS = 500  # the newest experiments of the session; a night has ~100 per GPU
_DESCRIPTION_LIMIT = 200
_DIFF_LIMIT = 20_000


@dataclass(frozen=True)
class LaneView:
    lane: str
    gpu_uuid: str | None
    state: str
    experiment_id: int | None = None
    description: str = ""
    since: datetime | None = None
    reason: str = ""  # why a lane is paused (foreign process, crash streak...)


class LiveState:
    """What the loop knows right now and the database does not: the open window and each lane's activity."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._window: Window | None = None
        self._next_window: Window | None = None
        self._session_id: int | None = None
        self._lanes: dict[str, LaneView] = {}

    def set_window(self, window: Window | None, next_window: Window | None = None) -> None:
        with self._lock:
            self._window, self._next_window = window, next_window

    def set_session(self, session_id: int | None) -> None:
        with self._lock:
            self._session_id = session_id

    def set_lane(
        self,
        lane: str,
        gpu_uuid: str | None,
        state: str,
        *,
        experiment_id: int | None = None,
        description: str = "",
        reason: str = "",
        since: datetime | None = None,
    ) -> None:
        if state not in LANE_STATES:
            raise ValueError(f"unknown lane state {state!r}; use one of {', '.join(LANE_STATES)}")
        view = LaneView(lane, gpu_uuid, state, experiment_id, description,
                        since or datetime.now(timezone.utc), reason)
        with self._lock:
            self._lanes[lane] = view

    def snapshot(self) -> tuple[Window | None, Window | None, int | None, list[LaneView]]:
        with self._lock:
            lanes = [view for _, view in sorted(self._lanes.items())]
            return self._window, self._next_window, self._session_id, lanes


def _text(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _short(text: str, limit: int = _DESCRIPTION_LIMIT) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _bpb(value: float | None) -> str:
    return "–" if value is None else f"{value:.6f}"


def _duration(seconds: float) -> str:
    minutes = int(max(seconds, 0.0) // 60)  # a lane state stamped a moment after `now` is "0 min", not negative
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _window_html(window: Window | None, upcoming: Window | None, now: datetime) -> str:
    if window is not None:
        left = _duration(window.remaining(now).total_seconds())
        return (f'<p id="window" class="open">Window <b>{_text(window.name)}</b> open since '
                f"{_text(f'{window.start:%a %H:%M}')}, until {_text(f'{window.end:%a %H:%M %Z}')} ({left} left)</p>")
    if upcoming is not None:
        return (f'<p id="window" class="closed">No window open; next: <b>{_text(upcoming.name)}</b> at '
                f"{_text(f'{upcoming.start:%a %d %b %H:%M %Z}')}</p>")
    return '<p id="window" class="closed">No window open and none scheduled (idle harvesting only).</p>'


def _lanes_html(lanes: Sequence[LaneView], now: datetime) -> str:
    if not lanes:
        return "<p>No lane is running.</p>"
    rows = []
    for lane in lanes:
        since = _duration((now - lane.since).total_seconds()) if lane.since is not None else ""
        experiment = f"#{lane.experiment_id}" if lane.experiment_id is not None else ""
        rows.append(
            f'<tr class="lane {_text(lane.state)}"><td>{_text(lane.lane)}</td><td>{_text(lane.gpu_uuid or "cpu")}</td>'
            f"<td>{_text(lane.state)}</td><td>{experiment}</td><td>{_text(_short(lane.description))}</td>"
            f"<td>{_text(lane.reason)}</td><td>{since}</td></tr>"
        )
    return ('<table id="lanes"><thead><tr><th>lane</th><th>GPU</th><th>state</th><th>experiment</th>'
            "<th>description</th><th>note</th><th>for</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def chart_svg(points: Sequence[ChartPoint], width: int = 860, height: int = 300) -> str:
    """Inline SVG of val_bpb per experiment: best-so-far staircase, kept and other runs, failures at the bottom."""
    measured = [p for p in points if p.val_bpb is not None]
    if not measured:
        return '<p id="chart">No evaluated experiment yet.</p>'
    left, right, top, bottom = 70, 15, 15, 40
    values = [p.val_bpb for p in measured if p.val_bpb is not None]
    low, high = min(values), max(values)
    pad = (high - low) * 0.08 or abs(high) * 0.01 or 0.01
    low, high = low - pad, high + pad
    count = max(len(points), 1)
    fail_y = height - bottom + 12

    def x_of(x: int) -> float:
        return left + (x - 0.5) / count * (width - left - right)

    def y_of(v: float) -> float:
        return top + (high - v) / (high - low) * (height - top - bottom)

    parts = [f'<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="val_bpb per experiment">',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="#fafafa" stroke="#ccc"/>']
    for i in range(5):
        value = low + (high - low) * i / 4
        y = y_of(value)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{value:.4f}</text>')
    stair = [(p.x, p.best_so_far) for p in points if p.best_so_far is not None]
    if stair:
        first_x, first_y = stair[0]
        path = f"M{x_of(first_x):.1f} {y_of(first_y):.1f}"
        for x, best in stair[1:]:
            path += f" H{x_of(x):.1f} V{y_of(best):.1f}"
        path += f" H{x_of(points[-1].x):.1f}"
        parts.append(f'<path class="staircase" d="{path}" fill="none" stroke="#2a9d3a" stroke-width="2"/>')
    for p in points:
        title = f"<title>#{p.experiment_id} {_text(p.kind)} {_text(p.status)} {_bpb(p.val_bpb)}</title>"
        if p.failed:
            cx, cy = x_of(p.x), fail_y
            parts.append(f'<g class="point failed"><path d="M{cx - 4:.1f} {cy - 4:.1f} L{cx + 4:.1f} {cy + 4:.1f} '
                         f'M{cx - 4:.1f} {cy + 4:.1f} L{cx + 4:.1f} {cy - 4:.1f}" stroke="#d62728" stroke-width="2"/>'
                         f"{title}</g>")
        elif p.val_bpb is not None:
            kept = p.status == "kept"
            parts.append(f'<circle class="point {"kept" if kept else "other"}" cx="{x_of(p.x):.1f}" '
                         f'cy="{y_of(p.val_bpb):.1f}" r="{5 if kept else 3}" '
                         f'fill="{"#2a9d3a" if kept else "#888"}" stroke="{"#000" if kept else "none"}">'
                         f"{title}</circle>")
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 4}" text-anchor="middle" '
                 'font-size="11">experiment (session order); green: kept and best so far; grey: discarded or '
                 "measured; red x: crashed / timeout / oom / invalid</text></svg>")
    return "".join(parts)


def _experiments_html(experiments: Sequence[ExperimentRecord], baseline_bpb: float | None) -> str:
    if not experiments:
        return '<p id="experiments">No experiment in this session yet.</p>'
    rows = []
    for record in experiments:
        delta = (f"{record.val_bpb - baseline_bpb:+.6f}"
                 if record.val_bpb is not None and baseline_bpb is not None else "")
        finished = f"{record.finished_at:%H:%M}" if record.finished_at is not None else ""
        rows.append(
            f'<tr class="experiment" data-id="{record.id}" data-status="{_text(record.status)}">'
            f"<td>{record.id}</td><td>{finished}</td><td>{_text(record.lane or '')}</td><td>{_text(record.kind)}</td>"
            f'<td class="status {_text(record.status)}">{_text(record.status)}</td><td>{_bpb(record.val_bpb)}</td>'
            f"<td>{delta}</td><td>{_text(_short(record.description))}</td></tr>"
        )
    return ('<table id="experiments"><thead><tr><th>id</th><th>finished</th><th>lane</th><th>kind</th>'
            "<th>status</th><th>val_bpb</th><th>Δ baseline</th><th>description</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1100px}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;width:100%;font-size:0.9em}
th,td{border-bottom:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
td.status.kept{color:#1d7a2c;font-weight:bold}td.status.discarded,td.status.measured{color:#666}
td.status.crashed,td.status.timeout,td.status.oom,td.status.invalid{color:#c0392b}
p.open{color:#1d7a2c}p.closed{color:#666}
pre{background:#f4f4f4;padding:0.8em;overflow-x:auto;font-size:0.85em}
.summary span{margin-right:1.6em}
"""


def _retest_headline(store: Store, session_id: int, config: dict[str, object]) -> str:
    """The morning re-test's night gain line (`daemon.ops.retest_report`)."""
    from daemon.ops.retest_report import confidence_of, night_headline
    from daemon.research.retest import comparisons

    confidence = confidence_of(config)
    return night_headline(comparisons(store, [session_id], confidence), confidence)


def render_status_page(store: Store, state: LiveState, now: datetime | None = None) -> str:
    """The whole page as one HTML string (refreshes itself every 30 s)."""
    moment = now or datetime.now(timezone.utc)
    window, upcoming, session_id, lanes = state.snapshot()
    session = store.get_session(session_id) if session_id is not None else store.latest_session()
    body = ["<h1>autoresearch</h1>", _window_html(window, upcoming, moment), "<h2>Lanes</h2>",
            _lanes_html(lanes, moment)]
    if session is None:
        body.append("<p>No research session has run yet.</p>")
    else:
        experiments = store.list_experiments(session_id=session.id, limit=_TABLE_ROWS)
        baseline = store.baseline(session.id)
        best = store.best(session.id)
        noise = store.noise_floor(session.id)
        baseline_bpb = baseline.val_bpb if baseline is not None else None
        delta = (f" ({best.val_bpb - baseline_bpb:+.6f} vs baseline)"
                 if best is not None and best.val_bpb is not None and baseline_bpb is not None else "")
        body += [
            f"<h2>Session {session.id}: {_text(session.tag)} ({_text(session.status)})</h2>",
            '<p class="summary">'
            f'<span id="best">best <b>{_bpb(best.val_bpb if best else None)}</b>{delta}</span>'
            f"<span>baseline {_bpb(baseline_bpb)}</span>"
            f"<span>noise std {noise.std:.6f} (n={noise.n})</span>"
            f"<span>experiments {len(experiments)}</span></p>",
            f'<p id="retest">{_text(_retest_headline(store, session.id, session.config))}</p>',
            chart_svg(val_bpb_series(experiments)),
            "<h2>Experiments (newest first)</h2>",
            _experiments_html(experiments, baseline_bpb),
            "<h2>Best diff against the baseline</h2>",
        ]
        if best is not None and best.diff.strip():
            diff = best.diff if len(best.diff) <= _DIFF_LIMIT else best.diff[:_DIFF_LIMIT] + "\n… (cut)"
            body.append(f'<pre id="best-diff">{_text(diff)}</pre>')
        else:
            body.append('<p id="best-diff">The best is the baseline (no diff).</p>')
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="refresh" content="30"><meta name="viewport" content="width=device-width">'
        f"<title>autoresearch status</title><style>{_STYLE}</style></head><body>"
        + "".join(body)
        + f'<p style="color:#999;font-size:0.8em">generated {moment:%Y-%m-%d %H:%M:%S %Z}</p></body></html>'
    )
