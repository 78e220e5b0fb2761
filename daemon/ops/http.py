"""The daemon's HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (liveness), `/` (status page),
`/status.json` (the same status as data, for `autoresearch status` and scripts; read-only, no secrets).

Wiring, in the `run` command:

    heartbeat = Heartbeat(max_age_s=...)            # the loop calls heartbeat.beat() at least that often
    server = start_http_server(settings.metrics.host, settings.metrics.port, metrics.registry,
                               db_ping=store_ping, heartbeat=heartbeat, status_page=render_page)
    ... server.url, server.port (port 0 = an ephemeral port, for tests) ...
    server.close()

`/healthz` answers 200 only when `db_ping()` returns without raising AND the heartbeat is fresh;
otherwise 503 with the reason as plain text. The server runs in daemon threads and never raises into
the loop: a failing status page answers 500 with a short message.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from daemon.errors import AutoresearchError
from daemon.ops.logs import get_logger

log = get_logger("autoresearch.http")


class Heartbeat:
    """The research loop's sign of life: `beat()` on every tick; stale after `max_age_s` without one."""

    def __init__(self, max_age_s: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        if max_age_s <= 0:
            raise ValueError(f"heartbeat max_age_s must be positive, got {max_age_s}")
        self.max_age_s = max_age_s
        self._monotonic = monotonic
        self._last: float | None = None
        self._lock = threading.Lock()

    def beat(self) -> None:
        with self._lock:
            self._last = self._monotonic()

    def age(self) -> float | None:
        """Seconds since the last beat, or None before the first one."""
        with self._lock:
            return None if self._last is None else self._monotonic() - self._last

    def fresh(self) -> bool:
        age = self.age()
        return age is not None and age <= self.max_age_s


def health(db_ping: Callable[[], object], heartbeat: Heartbeat) -> tuple[bool, str]:
    """(healthy, reason): the database answers and the research loop ticked recently.

    `db_ping` says "unreachable" by raising or by returning False (as `Store.ping` does).
    """
    try:
        answered = db_ping()
    except Exception as exc:  # any failure of the ping means "unreachable"; the reason goes to the prober
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return False, f"database unreachable: {type(exc).__name__}: {first_line}"
    if answered is False:
        return False, "database unreachable: the ping got no answer"
    age = heartbeat.age()
    if age is None:
        return False, "research loop has not started yet"
    if age > heartbeat.max_age_s:
        return False, f"research loop silent for {age:.0f} s (limit {heartbeat.max_age_s:.0f} s)"
    return True, "ok"


class _Handler(BaseHTTPRequestHandler):
    server: _DaemonHTTPServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self.server.registry))
        elif path == "/healthz":
            ok, reason = health(self.server.db_ping, self.server.heartbeat)
            status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
            self._send(status, "text/plain; charset=utf-8", (reason + "\n").encode())
        elif path == "/" and self.server.status_page is not None:
            try:
                page = self.server.status_page()
            except Exception as exc:  # the page must never take the daemon down
                log.warning("status page failed", error=f"{type(exc).__name__}: {exc}")
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8",
                           b"status page failed; see the daemon log\n")
                return
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", page.encode())
        elif path == "/status.json" and self.server.status_json is not None:
            try:
                data = self.server.status_json()
            except Exception as exc:  # e.g. the database is down: say so, keep serving
                log.warning("status data failed", error=f"{type(exc).__name__}: {exc}")
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, "application/json",
                           json.dumps({"error": f"status unavailable: {type(exc).__name__}"}).encode())
                return
            self._send(HTTPStatus.OK, "application/json", json.dumps(data).encode())
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found: try /, /status.json, /metrics or /healthz\n")

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes every 15 s would flood the journal; errors still reach log_error.
        pass

    def log_error(self, format: str, *args: Any) -> None:
        log.warning("http error", message=format % args)


class _DaemonHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        db_ping: Callable[[], object],
        heartbeat: Heartbeat,
        status_page: Callable[[], str] | None,
        status_json: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.registry = registry
        self.db_ping = db_ping
        self.heartbeat = heartbeat
        self.status_page = status_page
        self.status_json = status_json
        super().__init__(address, _Handler)


class _DaemonHTTPServer6(_DaemonHTTPServer):
    address_family = socket.AF_INET6


class DaemonHTTPServer:
    """A running endpoint; `close()` stops it and frees the port."""

    def __init__(self, server: _DaemonHTTPServer) -> None:
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.1,), name="autoresearch-http", daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_http_server(
    host: str,
    port: int,
    registry: CollectorRegistry,
    *,
    db_ping: Callable[[], object],
    heartbeat: Heartbeat,
    status_page: Callable[[], str] | None = None,
    status_json: Callable[[], dict[str, Any]] | None = None,
) -> DaemonHTTPServer:
    """Bind and serve in a background thread; a taken port raises `AutoresearchError` with the fix."""
    server_class = _DaemonHTTPServer6 if ":" in host else _DaemonHTTPServer
    try:
        server = server_class((host, port), registry, db_ping, heartbeat, status_page, status_json)
    except OSError as exc:
        raise AutoresearchError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror}",
            hint="set [metrics] port (or AUTORESEARCH_METRICS__PORT) to a free port, or stop the other daemon",
        ) from None
    return DaemonHTTPServer(server)
