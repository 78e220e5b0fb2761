"""The daemon's HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (liveness), `/` (status page),
`/status.json` (the same status as data, for `autoresearch status` and scripts; read-only, no secrets).

Wiring, in the `run` command:

    heartbeat = Heartbeat(max_age_s=...)            # the loop calls heartbeat.beat() at least that often
    server = start_http_server(settings.metrics.host, settings.metrics.port, metrics.registry,
                               db_ping=store_ping, heartbeat=heartbeat, status_page=render_page)
    ... server.url, server.port (port 0 = an ephemeral port, for tests) ...
    server.close()

With `web_config` (a web-config file in the format of Prometheus' exporters, daemon.ops.webconfig) the
server speaks TLS and asks for basic auth on every path but `/healthz` (liveness probes carry no
credentials; it says only "ok" or why not).

`/healthz` answers 200 only when `db_ping()` returns without raising AND the heartbeat is fresh;
otherwise 503 with the reason as plain text. The server runs in daemon threads and never raises into
the loop: a failing status page answers 500 with a short message.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from daemon.errors import AutoresearchError
from daemon.ops.logs import get_logger
from daemon.ops.webconfig import WebConfig, load_web_config

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
        if path != "/healthz" and not self.server.web_config.authorized(self.headers.get("Authorization")):
            body = b"unauthorized\n"
            self.send_response(HTTPStatus.UNAUTHORIZED)
            self.send_header("WWW-Authenticate", 'Basic realm="autoresearch", charset="UTF-8"')
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
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
        web_config: WebConfig | None = None,
    ) -> None:
        self.web_config = web_config if web_config is not None else WebConfig()
        self.registry = registry
        self.db_ping = db_ping
        self.heartbeat = heartbeat
        self.status_page = status_page
        self.status_json = status_json
        super().__init__(address, _Handler)


    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, in the request's own thread: a slow or silent client cannot stall accept().
        context = self.web_config.ssl_context
        if context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(_TLS_HANDSHAKE_TIMEOUT_S)
        try:
            wrapped = context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):  # a plain-HTTP client, a port scan, a bad client certificate
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            wrapped.close()


_TLS_HANDSHAKE_TIMEOUT_S = 10.0


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
        scheme = "https" if self._server.web_config.ssl_context is not None else "http"
        return f"{scheme}://{host}:{self.port}"

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
    web_config: Path | None = None,
) -> DaemonHTTPServer:
    """Bind and serve in a background thread; a taken port raises `AutoresearchError` with the fix, a bad
    `web_config` file `ConfigError`."""
    loaded = load_web_config(web_config) if web_config is not None else None
    server_class = _DaemonHTTPServer6 if ":" in host else _DaemonHTTPServer
    try:
        server = server_class((host, port), registry, db_ping, heartbeat, status_page, status_json, loaded)
    except OSError as exc:
        raise AutoresearchError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror}",
            hint="set [metrics] port (or AUTORESEARCH_METRICS__PORT) to a free port, or stop the other daemon",
        ) from None
    return DaemonHTTPServer(server)
