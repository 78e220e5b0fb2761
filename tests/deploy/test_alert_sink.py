"""deploy/alertmanager/alert_sink.py, the compose stack's default receiver: its heartbeat health and its answers."""

from __future__ import annotations

import importlib.util
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "alertmanager" / "alert_sink.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("alert_sink", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sink_module = _module()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _body(severity: str, alertname: str, status: str = "firing") -> dict[str, Any]:
    return {"receiver": severity, "alerts": [{"status": status, "labels": {"alertname": alertname,
                                                                            "severity": severity, "instance": "a"},
                                              "annotations": {"summary": "s"}}]}


def test_sink_turns_unhealthy_when_the_heartbeat_stops() -> None:
    """Healthy while heartbeats arrive within the limit; 503-worthy once the last one is older."""
    clock = Clock()
    sink = sink_module.Sink(heartbeat_max_age_s=900, monotonic=clock)
    assert sink.health()[0], "a fresh sink waits for its first heartbeat"
    sink.receive(_body("heartbeat", "AutoresearchAlertingHeartbeat"))
    clock.now += 600
    assert sink.health()[0]
    clock.now += 301
    ok, reason = sink.health()
    assert not ok and "broken" in reason


def test_sink_that_never_got_a_heartbeat_is_unhealthy_after_the_limit() -> None:
    """No heartbeat at all since start, for longer than the limit, is a broken path too."""
    clock = Clock()
    sink = sink_module.Sink(heartbeat_max_age_s=900, monotonic=clock)
    sink.receive(_body("critical", "AutoresearchDaemonDown"))  # other alerts are no heartbeat
    clock.now += 901
    assert not sink.health()[0]


def test_heartbeats_are_recorded_but_never_forwarded() -> None:
    """receive() returns the alerts to forward: everything but the heartbeat."""
    sink = sink_module.Sink(heartbeat_max_age_s=900)
    assert sink.receive(_body("heartbeat", "AutoresearchAlertingHeartbeat")) == []
    forwarded = sink.receive(_body("warning", "AutoresearchDiskLow"))
    assert [alert["alertname"] for alert in forwarded] == ["AutoresearchDiskLow"]
    assert [line["alertname"] for line in sink.recent] == ["AutoresearchDiskLow", "AutoresearchAlertingHeartbeat"]


@pytest.fixture()
def serve_sink() -> Iterator[Any]:
    servers: list[ThreadingHTTPServer] = []

    def start(sink: Any) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), sink_module.handler_for(sink))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _post(url: str, data: bytes) -> int:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize("data", [b"not json", b"[1, 2]", b"\xff\xfe"])
def test_a_body_that_is_no_webhook_gets_400(serve_sink: Any, data: bytes) -> None:
    """Anything but a JSON object is refused with 400 and the sink keeps serving."""
    url = serve_sink(sink_module.Sink(heartbeat_max_age_s=900))
    assert _post(url + "/critical", data) == 400
    assert _post(url + "/critical", json.dumps(_body("critical", "X")).encode()) == 200


def test_a_failed_forward_answers_502_so_alertmanager_retries(serve_sink: Any) -> None:
    """With a forward URL nobody answers, the sink says 502 (Alertmanager retries and logs the failure)."""
    from tests.pgcluster import free_port

    sink = sink_module.Sink(heartbeat_max_age_s=900, forward_url=f"http://127.0.0.1:{free_port()}/chat")
    url = serve_sink(sink)
    assert _post(url + "/critical", json.dumps(_body("critical", "AutoresearchDaemonDown")).encode()) == 502
    assert _post(url + "/heartbeat", json.dumps(_body("heartbeat", "AutoresearchAlertingHeartbeat")).encode()) == 200


def _seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return int(duration[:-1]) * units[duration[-1]]


def test_heartbeat_repeats_well_within_the_sinks_limit() -> None:
    """The heartbeat route repeats (group_interval + repeat_interval) at most a third of the sink's max age in compose,
    so one lost notification never marks the path broken."""
    import yaml

    deploy = SCRIPT.parents[1]
    config = yaml.safe_load((deploy / "alertmanager" / "alertmanager.compose.yml").read_text())
    route = next(r for r in config["route"]["routes"] if r["matchers"] == ['severity="heartbeat"'])
    limit = float(yaml.safe_load((deploy / "compose.yaml").read_text())["services"]["alert-sink"]["environment"]
                  ["ALERT_SINK_HEARTBEAT_MAX_AGE_S"])
    assert 3 * (_seconds(route["group_interval"]) + _seconds(route["repeat_interval"])) <= limit
