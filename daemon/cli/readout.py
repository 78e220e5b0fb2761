"""Read-only commands for people and scripts: `status`, `experiments`, `best`, `report`, each with `--json`.

`status` asks the running daemon (`/healthz` and `/status.json` on its metrics port) and exits 0 when it is
healthy, 4 when it answers but is unhealthy, 3 when no daemon answers (then it shows the database's last
state, when readable; 5 when that database cannot be reached either). Whatever answers counts as the daemon
only when its `/status.json` has the daemon's shape (`daemon.cli.status_answer`). With `--url` it needs
neither the config nor the database: a researcher of the lab reads the status of a system install this way.
Exit codes: `daemon.cli.exits`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from typing import Any

from daemon.cli import exits
from daemon.cli.status_answer import daemon_base_url, parse_status, printable
from daemon.cli.tables import render_table
from daemon.config import Settings
from daemon.errors import AutoresearchError, DatabaseUnreachable, NothingYet, UsageError
from daemon.ops.statusdata import experiment_data, session_data, tonight_meaning

EXIT_UNHEALTHY, EXIT_NOT_RUNNING = exits.UNHEALTHY, exits.NOT_RUNNING
ANSWER_LIMIT_BYTES = 4 * 1024 * 1024  # a status answer larger than this is not the daemon's
EXPERIMENT_HEADERS = ("id", "kind", "status", "val_bpb", "lane", "attempt", "commit", "description")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def daemon_url(settings: Settings) -> str | None:
    """Where the daemon of this config answers (None when it serves no HTTP: metrics.port = 0)."""
    if settings.metrics.port == 0:
        return None
    host = settings.metrics.host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{settings.metrics.port}" if ":" in host else f"http://{host}:{settings.metrics.port}"


def _first_line(raw: bytes) -> str:
    lines = raw[:2000].decode(errors="replace").strip().splitlines()
    return printable(lines[0][:300]) if lines else ""


def ask_daemon(url: str, timeout: float = 5.0) -> tuple[str, str, dict[str, Any] | None]:
    """(state, health reason, status data): state is running, unhealthy or not running. Only an answer whose
    `/status.json` has the daemon's shape is the daemon; anything else on the address is "not running"."""
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=timeout) as answer:
            reason = _first_line(answer.read(ANSWER_LIMIT_BYTES))
        state = "running"
    except urllib.error.HTTPError as exc:
        reason = _first_line(exc.read(ANSWER_LIMIT_BYTES)) or f"HTTP {exc.code}"
        state = "unhealthy"
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        return "not running", printable(f"no answer from {url} ({getattr(exc, 'reason', exc)})"), None
    try:
        with urllib.request.urlopen(f"{url}/status.json", timeout=timeout) as answer:
            body = answer.read(ANSWER_LIMIT_BYTES + 1)
        raw = json.loads(body) if len(body) <= ANSWER_LIMIT_BYTES else None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException, RecursionError) as exc:
        return "not running", printable(f"something answers at {url}, but not an autoresearch daemon "
                                        f"(/status.json: {getattr(exc, 'reason', exc)})"), None
    data, problem = parse_status(raw)
    if data is None:
        return "not running", printable(f"something answers at {url}, but {problem}"), None
    return state, reason, data


def _offline_data(settings: Settings) -> dict[str, Any]:
    """What the database says when no daemon answers (or an error line when it cannot be read)."""
    from daemon.cli.commands import _open_store
    from daemon.service.scheduler import current_window, next_window

    now = datetime.now(timezone.utc)
    window = current_window(settings.scheduler.windows, settings.scheduler.timezone, now)
    upcoming = next_window(settings.scheduler.windows, settings.scheduler.timezone, now)
    since = window.start if window is not None else now - timedelta(hours=24)
    meaning = (tonight_meaning(window, since) if window is not None
               else "the last 24 h (no daemon answers and no window is open)")
    data: dict[str, Any] = {
        "window": None if window is None else {"name": window.name, "start": window.start.isoformat(),
                                               "end": window.end.isoformat()},
        "next_window": None if upcoming is None else {"name": upcoming.name, "start": upcoming.start.isoformat(),
                                                      "end": upcoming.end.isoformat()},
        "lanes": [], "tonight": {"since": since.isoformat(timespec="seconds"), "meaning": meaning},
    }
    try:
        store = _open_store(settings)
    except AutoresearchError as exc:
        data["database_error"] = str(exc)
        data["database_unreachable"] = isinstance(exc, DatabaseUnreachable)
        return data
    try:
        data.update(session_data(store, None))
        data["cost"] = {"usd": round(float(store.cost_since(since)), 4),
                        "cap_usd": settings.agent.nightly_cost_cap_usd, "since": since.isoformat(timespec="seconds")}
    finally:
        store.close()
    return data


def _render_status(state: str, url: str | None, reason: str, data: dict[str, Any]) -> str:
    lines = [f"daemon: {state}" + (f" at {url}" if url else "") + (f" ({reason})" if reason else "")]
    who = data.get("daemon")
    if who:
        lines.append(f"  instance {who['instance']}, version {who['version']}, owner {who['owner']}")
    window, upcoming = data.get("window"), data.get("next_window")
    if window:
        lines.append(f"window: {window['name'] or 'open'} open until {window['end']}")
    else:
        lines.append("window: closed" + (f"; next opens {upcoming['start']}" if upcoming else ""))
    if data.get("lanes"):
        lines.append("lanes:")
        rows = [(lane["lane"], "-" if lane["gpu_index"] is None else lane["gpu_index"], lane["gpu_uuid"] or "cpu",
                 lane["state"], f"#{lane['experiment_id']}" if lane["experiment_id"] else "",
                 lane["reason"] or lane["description"]) for lane in data["lanes"]]
        lines.append(render_table(("lane", "gpu", "uuid", "state", "experiment", "note"), rows))
    if "database_error" in data:
        lines.append(f"database: {data['database_error']}")
    session = data.get("session")
    if session:
        lines.append(f"session {session['id']} ({session['tag']}, {session['trigger']}): {session['status']}, "
                     f"started {session['started_at']}")
        for run in data.get("running", []):
            lines.append(f"  running #{run['id']} {run['kind']} on {run['lane']}: {run['description']}")
        best, baseline = data.get("best"), data.get("baseline")
        if best and best.get("val_bpb") is not None:
            delta = (f" ({best['val_bpb'] - baseline['val_bpb']:+.6f} vs baseline)"
                     if baseline and baseline.get("val_bpb") is not None else "")
            lines.append(f"best: {best['val_bpb']:.6f} (experiment {best['id']}){delta}")
    elif "session" in data:
        lines.append("no session yet: run `autoresearch once` or start the daemon")
    cost, tonight = data.get("cost"), data.get("tonight")
    if cost and tonight:
        lines.append(f"agent cost tonight: ${cost['usd']:.2f} of ${cost['cap_usd']:.2f} cap; "
                     f"tonight = {tonight['meaning']}")
    return printable("\n".join(lines))


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    url = daemon_base_url(args.url) if args.url is not None else daemon_url(settings)
    if url is None:
        state, reason, data = "not running", "this config serves no HTTP endpoint (metrics.port = 0)", None
    else:
        state, reason, data = ask_daemon(url)
    if data is None:
        data = {} if args.url else _offline_data(settings)
    if args.json:
        _print_json({**data, "state": state, "url": url, "health": reason})
    else:
        print(_render_status(state, url, reason, data))
    if state == "not running" and data.get("database_unreachable"):
        return exits.DB_UNREACHABLE
    return {"running": exits.OK, "unhealthy": EXIT_UNHEALTHY}.get(state, EXIT_NOT_RUNNING)


def cmd_experiments(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.cli.commands import _open_store
    from daemon.store.records import STATUSES

    if args.status is not None and args.status not in STATUSES:
        raise UsageError(f"unknown status {args.status!r}", hint=f"one of: {', '.join(STATUSES)}")
    if args.limit <= 0:
        raise UsageError(f"--limit must be positive, got {args.limit}", hint="e.g. --limit 50")
    store = _open_store(settings)
    try:
        rows = list(reversed(store.list_experiments(session_id=args.session, status=args.status, limit=args.limit)))
    finally:
        store.close()
    if args.json:
        _print_json([experiment_data(r) for r in rows])
        return 0
    print(render_table(EXPERIMENT_HEADERS, [
        (r.id, r.kind, r.status, r.val_bpb, r.lane, r.attempt, (r.commit or "")[:10], r.description)
        for r in rows]) if rows else "no experiments match")
    return 0


def cmd_best(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.cli.commands import _open_store, _session_or_latest
    from daemon.research import unified_diff

    store = _open_store(settings)
    try:
        session = _session_or_latest(store, None)
        best, baseline = store.best(session.id), store.baseline(session.id)
    finally:
        store.close()
    if best is None or baseline is None or best.val_bpb is None or baseline.val_bpb is None:
        raise NothingYet(f"session {session.id} has no measured baseline yet",
                                hint="wait for the first experiment, or run `autoresearch once`")
    diff = unified_diff(baseline.source, best.source)
    if args.json:
        _print_json({"session_id": session.id, "best": experiment_data(best), "baseline": experiment_data(baseline),
                     "delta": best.val_bpb - baseline.val_bpb, "diff": diff})
        return 0
    print(f"best val_bpb {best.val_bpb:.6f} (experiment {best.id}, commit {best.commit[:12] or '-'}); "
          f"baseline {baseline.val_bpb:.6f}; delta {best.val_bpb - baseline.val_bpb:+.6f}")
    print(diff if diff else "(the best is the baseline: no diff)")
    return 0


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.cli.commands import _open_store, _session_or_latest
    from daemon.ops.report import write_report
    from daemon.research.workspace import Workspace

    store = _open_store(settings)
    try:
        session = _session_or_latest(store, args.session)
        out = args.out if args.out is not None else Workspace(settings.workspace).reports_dir
        path = write_report(store, session.id, out)
    finally:
        store.close()
    if args.json:
        _print_json({"session_id": session.id, "report": str(path),
                     "files": sorted(str(p) for p in path.parent.iterdir())})
        return 0
    print(f"report: {path}")
    return 0
