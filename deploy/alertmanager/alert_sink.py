"""A small Alertmanager webhook receiver: the compose stack's default, so alerts arrive somewhere as shipped.

Standard library only (it runs in the daemon's image, or with any python3 >= 3.10 on a host):

    python3 deploy/alertmanager/alert_sink.py            # ALERT_SINK_LISTEN=127.0.0.1:9095 by default

- POST /<receiver>   Alertmanager's webhook JSON: each alert becomes one JSON line on stdout
                     (`docker compose logs alert-sink`, the journal on a host) and a line of GET /.
                     With ALERT_SINK_FORWARD_URL set, each non-heartbeat alert is also posted there as
                     {"text": "..."} (Slack, Mattermost, Rocket.Chat and most chat bridges take that);
                     a failed forward answers 502, so Alertmanager retries and logs it.
- GET /              the last alerts, newest first, as plain text.
- GET /healthz       200 while the always-firing AutoresearchAlertingHeartbeat (every 5-6 min) arrives at
                     least every ALERT_SINK_HEARTBEAT_MAX_AGE_S (1200 s: three heartbeats may be late); 503
                     when it stops: Prometheus, Alertmanager or the route between them is broken, and no
                     alert would reach anyone.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HEARTBEAT_SEVERITY = "heartbeat"


class Sink:
    """What the sink remembers: recent alerts and when the last heartbeat came."""

    def __init__(self, heartbeat_max_age_s: float, forward_url: str = "",
                 monotonic: Callable[[], float] = time.monotonic, keep: int = 500) -> None:
        self.heartbeat_max_age_s = heartbeat_max_age_s
        self.forward_url = forward_url
        self._monotonic = monotonic
        self._started = monotonic()
        self._last_heartbeat: float | None = None
        self._lock = threading.Lock()
        self.recent: collections.deque[dict[str, str]] = collections.deque(maxlen=keep)

    def receive(self, body: dict[str, Any]) -> list[dict[str, str]]:
        """Record one webhook notification; returns the alerts to forward (all but heartbeats)."""
        receiver = str(body.get("receiver", ""))
        lines = []
        for alert in body.get("alerts", []):
            labels, annotations = alert.get("labels", {}), alert.get("annotations", {})
            line = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "receiver": receiver,
                    "status": str(alert.get("status", "")), "alertname": str(labels.get("alertname", "")),
                    "severity": str(labels.get("severity", "")), "instance": str(labels.get("instance", "")),
                    "summary": str(annotations.get("summary", ""))}
            lines.append(line)
        with self._lock:
            for line in lines:
                if line["severity"] == HEARTBEAT_SEVERITY and line["status"] == "firing":
                    self._last_heartbeat = self._monotonic()
                self.recent.appendleft(line)
        for line in lines:
            print(json.dumps(line), flush=True)
        return [line for line in lines if line["severity"] != HEARTBEAT_SEVERITY]

    def health(self) -> tuple[bool, str]:
        now = self._monotonic()
        with self._lock:
            last = self._last_heartbeat
        if last is None:
            waited = now - self._started
            if waited <= self.heartbeat_max_age_s:
                return True, f"waiting for the first heartbeat ({waited:.0f} s)"
            return False, f"no heartbeat alert in {waited:.0f} s since start: the alert path is broken"
        age = now - last
        if age > self.heartbeat_max_age_s:
            return False, f"last heartbeat alert {age:.0f} s ago (limit {self.heartbeat_max_age_s:.0f} s): " \
                          "the alert path is broken"
        return True, f"heartbeat {age:.0f} s ago"


def forward(url: str, alerts: list[dict[str, str]], timeout_s: float = 10.0) -> None:
    """Post the alerts as one chat message; raises OSError when the endpoint does not take it."""
    text = "\n".join(f"[{a['status'].upper()}] {a['severity']} {a['alertname']} {a['instance']}: {a['summary']}"
                     for a in alerts)
    request = urllib.request.Request(url, data=json.dumps({"text": text}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        response.read()


def handler_for(sink: Sink) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                if not isinstance(body, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError) as exc:
                self._send(400, f"not an Alertmanager webhook body: {exc}\n")
                return
            to_forward = sink.receive(body)
            if sink.forward_url and to_forward:
                try:
                    forward(sink.forward_url, to_forward)
                except (OSError, urllib.error.URLError) as exc:
                    print(json.dumps({"forward_failed": str(exc)}), file=sys.stderr, flush=True)
                    self._send(502, f"forward failed: {exc}\n")
                    return
            self._send(200, "ok\n")

        def do_GET(self) -> None:
            if self.path == "/healthz":
                ok, reason = sink.health()
                self._send(200 if ok else 503, reason + "\n")
            elif self.path == "/":
                rows = [" ".join(line.values()) for line in list(sink.recent)]
                self._send(200, "\n".join(rows or ["no alert received yet"]) + "\n")
            else:
                self._send(404, "not found: POST /<receiver>, GET / or /healthz\n")

        def _send(self, status: int, text: str) -> None:
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def main() -> int:
    listen = os.environ.get("ALERT_SINK_LISTEN", "127.0.0.1:9095")
    host, _, port = listen.rpartition(":")
    try:
        max_age = float(os.environ.get("ALERT_SINK_HEARTBEAT_MAX_AGE_S", "1200"))
        server = ThreadingHTTPServer((host.strip("[]") or "0.0.0.0", int(port)),
                                     handler_for(Sink(max_age, os.environ.get("ALERT_SINK_FORWARD_URL", ""))))
    except (ValueError, OSError) as exc:
        print(f"alert_sink: cannot start on {listen!r}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"alert_sink": f"listening on {listen}"}), flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
