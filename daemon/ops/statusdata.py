"""The daemon's status as JSON data: served at `/status.json`, printed by `autoresearch status [--json]`.

Read-only and free of secrets (no config, no keys, no sources, no logs), like the status page. "Tonight" is
always said explicitly: the cost counts from the start of the window the agent's cap follows (the open
window, else the last one, else the daemon's start), and `tonight.meaning` spells that out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from daemon.ops.retest_report import confidence_of, night_headline
from daemon.ops.statuspage import LiveState
from daemon.research.retest import comparisons, held_ratio, keep_results, kept_changes, night_result
from daemon.service.scheduler import Window
from daemon.store import ExperimentRecord, Store


@dataclass(frozen=True)
class LaneInfo:
    lane: str
    gpu_uuid: str | None
    gpu_index: int | None


@dataclass(frozen=True)
class DaemonFacts:
    """What only the running daemon knows: who it is, its lanes, and tonight's cost (usd, counted since)."""

    instance: str
    owner: str
    version: str
    lanes: Sequence[LaneInfo]
    cost: Callable[[], tuple[float, datetime]]
    cost_cap_usd: float


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds")


def _window(window: Window | None) -> dict[str, Any] | None:
    if window is None:
        return None
    return {"name": window.name, "start": _iso(window.start), "end": _iso(window.end)}


def experiment_data(record: ExperimentRecord) -> dict[str, Any]:
    """One experiment without its source, diff or log (those stay in the database and the report)."""
    return {
        "id": record.id, "session_id": record.session_id, "kind": record.kind, "status": record.status,
        "val_bpb": record.val_bpb, "lane": record.lane, "gpu_uuid": record.gpu_uuid, "attempt": record.attempt,
        "commit": record.commit or None, "description": record.description, "error": record.error or None,
        "started_at": _iso(record.started_at), "finished_at": _iso(record.finished_at),
    }


def tonight_meaning(window: Window | None, since: datetime) -> str:
    if window is not None:
        return f"since window {window.name or 'open'!r} opened at {since:%Y-%m-%d %H:%M %Z}"
    return f"since {since:%Y-%m-%d %H:%M %Z} (the last window's start, or the daemon's; no window is open now)"


def session_data(store: Store, session_id: int | None) -> dict[str, Any]:
    """The session (given, else the latest), its best and baseline: JSON data; `session` None before any."""
    session = store.get_session(session_id) if session_id is not None else store.latest_session()
    if session is None:
        return {"session": None, "best": None, "baseline": None, "retest": None}
    best, baseline = store.best(session.id), store.baseline(session.id)
    running = store.list_experiments(session_id=session.id, status=("running", "evaluating"), limit=100)
    return {
        "session": {"id": session.id, "tag": session.tag, "trigger": session.trigger, "status": session.status,
                    "started_at": _iso(session.started_at)},
        "best": experiment_data(best) if best is not None else None,
        "baseline": experiment_data(baseline) if baseline is not None else None,
        "running": [experiment_data(r) for r in running],
        "retest": retest_data(store, session.id, session.config),
    }


def retest_data(store: Store, session_id: int, config: dict[str, Any]) -> dict[str, Any]:
    """The morning re-test of the session: its night gain (Δ ± half-width on fresh seeds) and the keeps held."""
    confidence = confidence_of(config)
    found = comparisons(store, [session_id], confidence)
    night = night_result(found)
    results = keep_results(found, kept_changes(store, session_id))
    return {
        "headline": night_headline(found, confidence),
        "night": None if night is None else {
            "status": night.retest.status, "verdict": night.verdict, "delta_bpb": night.delta,
            "half_width_bpb": night.half_width, "pairs": night.pairs, "confidence": confidence,
            "base_id": night.retest.base_id, "best_id": night.retest.best_id, "note": night.retest.note or None},
        "keeps": {str(keep_id): result.verdict for keep_id, result in results.items()},
        "keeps_held_ratio": held_ratio(results),
    }


def status_data(store: Store, live: LiveState, facts: DaemonFacts, now: datetime | None = None) -> dict[str, Any]:
    """Everything `autoresearch status` shows, as the running daemon sees it now."""
    moment = now or datetime.now(timezone.utc)
    window, upcoming, session_id, views = live.snapshot()
    by_lane = {view.lane: view for view in views}
    lanes = []
    for info in facts.lanes:
        view = by_lane.get(info.lane)
        lanes.append({
            "lane": info.lane, "gpu_uuid": info.gpu_uuid, "gpu_index": info.gpu_index,
            "state": view.state if view is not None else "idle",
            "experiment_id": view.experiment_id if view is not None else None,
            "description": view.description if view is not None else "",
            "reason": view.reason if view is not None else "",
            "since": _iso(view.since) if view is not None else None,
        })
    usd, since = facts.cost()
    return {
        "daemon": {"instance": facts.instance, "owner": facts.owner, "version": facts.version},
        "now": _iso(moment),
        "window": _window(window),
        "next_window": _window(upcoming),
        "lanes": lanes,
        **session_data(store, session_id),
        "tonight": {"since": _iso(since), "meaning": tonight_meaning(window, since)},
        "cost": {"usd": round(usd, 4), "cap_usd": facts.cost_cap_usd, "since": _iso(since)},
    }
