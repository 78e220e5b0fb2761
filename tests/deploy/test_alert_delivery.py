"""The alert path end to end: a real Prometheus fires an alert of alerts.yml, a real Alertmanager (the deployed
alertmanager.yml) groups it, and its webhook receiver gets the POST.

Only the timings are shortened (scrape/evaluation every second, `for:` and `group_wait` cut), and the
addresses point at free ports; the rules, the route and the receiver come from deploy/.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.pgcluster import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

pytestmark = pytest.mark.prometheus


def _alertmanager_binary() -> str:
    found = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if found is None:
        pytest.fail("no alertmanager binary: run `make services` (apt-get install prometheus-alertmanager)")
    return found


@pytest.fixture()
def webhook() -> Iterator[tuple[str, queue.Queue[dict[str, Any]]]]:
    """A local HTTP receiver: (its URL, a queue of the JSON bodies posted to it)."""
    received: queue.Queue[dict[str, Any]] = queue.Queue()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            received.put(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alerts", received
    server.shutdown()
    server.server_close()


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as handle:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=handle, stdin=subprocess.DEVNULL)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _alertmanager_config(receiver_url: str) -> dict[str, Any]:
    config = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    config["route"]["group_wait"] = "1s"
    critical = next(r for r in config["receivers"] if r["name"] == "critical")
    webhooks = critical["webhook_configs"]
    assert len(webhooks) == 1, "the deployed critical receiver has one webhook"
    webhooks[0]["url"] = receiver_url
    return config


def _prometheus_config(scrape_target: str, alertmanager: str, rules: Path,
                       name: str = "prometheus.yml") -> dict[str, Any]:
    config = yaml.safe_load((DEPLOY / "prometheus" / name).read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(rules)]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [scrape_target]}]
    config["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [alertmanager]}]
    return config


def _shortened_rules(path: Path) -> None:
    """alerts.yml with AutoresearchDaemonDown's `for:` cut to 1 s (the expression is the deployed one)."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == "AutoresearchDaemonDown":
                rule["for"] = "1s"
    path.write_text(yaml.safe_dump(rules))


def test_daemon_down_alert_reaches_the_webhook_through_alertmanager(
        tmp_path: Path, webhook: tuple[str, queue.Queue[dict[str, Any]]]) -> None:
    """A daemon that cannot be scraped fires AutoresearchDaemonDown; Alertmanager posts it to the receiver."""
    receiver_url, received = webhook
    am_port, prom_port, dead_port = free_port(), free_port(), free_port()
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(_alertmanager_config(receiver_url)))
    _shortened_rules(tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(_prometheus_config(
        f"127.0.0.1:{dead_port}", f"127.0.0.1:{am_port}", tmp_path / "alerts.yml")))
    alertmanager = _start([_alertmanager_binary(), f"--config.file={tmp_path / 'alertmanager.yml'}",
                           f"--storage.path={tmp_path / 'am-data'}", f"--web.listen-address=127.0.0.1:{am_port}",
                           "--cluster.listen-address=", "--log.level=warn"], tmp_path / "alertmanager.log")
    prometheus = _start(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                         f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                        tmp_path / "prometheus.log")
    try:
        deadline = time.monotonic() + 120
        alert: dict[str, Any] | None = None
        while alert is None and time.monotonic() < deadline:
            for process, name in ((alertmanager, "alertmanager"), (prometheus, "prometheus")):
                assert process.poll() is None, (tmp_path / f"{name}.log").read_text()[-2000:]
            try:
                body = received.get(timeout=1)
            except queue.Empty:
                continue
            alert = next((a for a in body["alerts"] if a["labels"]["alertname"] == "AutoresearchDaemonDown"), None)
        assert alert is not None, ("no alert delivered: " + (tmp_path / "prometheus.log").read_text()[-1500:]
                                   + (tmp_path / "alertmanager.log").read_text()[-1500:])
    finally:
        _stop(prometheus)
        _stop(alertmanager)
    assert alert["status"] == "firing"
    assert alert["labels"]["severity"] == "critical"
    assert alert["labels"]["instance"] == f"127.0.0.1:{dead_port}"
    assert "journalctl" in alert["annotations"]["description"]


def test_alertmanager_config_is_valid() -> None:
    """amtool accepts the deployed alertmanager.yml, which has a receiver with a webhook."""
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.fail("no amtool: run `make services` (apt-get install prometheus-alertmanager)")
    done = subprocess.run([amtool, "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml")],
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    for receiver in config["receivers"]:
        if receiver["name"] in ("critical", "warning"):
            assert receiver["webhook_configs"][0]["send_resolved"] is True, receiver["name"]


@pytest.mark.parametrize("name", ["alertmanager.yml", "alertmanager.compose.yml"])
@pytest.mark.parametrize("severity", ["critical", "warning", "info", "heartbeat"])
def test_each_severity_routes_to_its_own_receiver(name: str, severity: str) -> None:
    """amtool: an alert of each severity the rules use goes to the receiver of that name."""
    done = subprocess.run(["amtool", "config", "routes", "test", f"--config.file={DEPLOY / 'alertmanager' / name}",
                           f"severity={severity}", "alertname=AnyAlert", "instance=a"],
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [severity]


def test_compose_alertmanager_config_is_the_host_one_with_the_sink_service_as_receiver() -> None:
    """alertmanager.compose.yml routes exactly like alertmanager.yml; only the webhooks' host differs."""
    host = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    compose_text = (DEPLOY / "alertmanager" / "alertmanager.compose.yml").read_text()
    urls = [hook["url"] for receiver in yaml.safe_load(compose_text)["receivers"]
            for hook in receiver.get("webhook_configs", [])]
    # A loopback receiver inside the Alertmanager container reaches nobody.
    assert not any("127.0.0.1" in url or "localhost" in url for url in urls), urls
    compose = yaml.safe_load(compose_text.replace("http://alert-sink:9095/", "http://127.0.0.1:9095/"))
    assert compose == host


def test_prometheus_sends_alerts_to_alertmanager() -> None:
    """Both Prometheus configurations have an `alerting:` section naming an Alertmanager."""
    for name, target in (("prometheus.yml", "127.0.0.1:9093"), ("prometheus.compose.yml", "alertmanager:9093")):
        config = yaml.safe_load((DEPLOY / "prometheus" / name).read_text())
        assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [target], name


def _sink_environment(listen: str, forward_url: str) -> dict[str, str]:
    """alert-sink's environment from compose.yaml, with only its address (and the forward URL) made local."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    env = {key: str(value) for key, value in compose["services"]["alert-sink"]["environment"].items()}
    env["ALERT_SINK_LISTEN"] = listen
    env["ALERT_SINK_FORWARD_URL"] = forward_url
    return env


def _get(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def test_compose_stack_as_shipped_delivers_alerts_and_the_heartbeat_to_alert_sink(
        tmp_path: Path, webhook: tuple[str, queue.Queue[dict[str, Any]]]) -> None:
    """The compose files as shipped: Prometheus (prometheus.compose.yml, alerts.yml) -> Alertmanager
    (alertmanager.compose.yml) -> alert-sink (alert_sink.py): the heartbeat arrives at once and keeps the sink
    healthy, DaemonDown arrives through the critical receiver and is forwarded to the chat webhook.

    Only service names become 127.0.0.1 ports (no compose network here) and the timings are shortened."""
    import os
    import sys

    chat_url, chat = webhook
    am_port, prom_port, sink_port, dead_port = free_port(), free_port(), free_port(), free_port()
    am_text = (DEPLOY / "alertmanager" / "alertmanager.compose.yml").read_text()
    am_config = yaml.safe_load(am_text.replace("http://alert-sink:9095/", f"http://127.0.0.1:{sink_port}/"))
    am_config["route"]["group_wait"] = "1s"
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(am_config))
    _shortened_rules(tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(_prometheus_config(
        f"127.0.0.1:{dead_port}", f"127.0.0.1:{am_port}", tmp_path / "alerts.yml", "prometheus.compose.yml")))
    sink_log = (tmp_path / "sink.log").open("w")
    sink = subprocess.Popen([sys.executable, str(DEPLOY / "alertmanager" / "alert_sink.py")], stdout=sink_log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **_sink_environment(f"127.0.0.1:{sink_port}", chat_url)})
    alertmanager = _start([_alertmanager_binary(), f"--config.file={tmp_path / 'alertmanager.yml'}",
                           f"--storage.path={tmp_path / 'am-data'}", f"--web.listen-address=127.0.0.1:{am_port}",
                           "--cluster.listen-address=", "--log.level=warn"], tmp_path / "alertmanager.log")
    prometheus = _start(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                         f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                        tmp_path / "prometheus.log")
    try:
        deadline = time.monotonic() + 120
        listing = ""
        while time.monotonic() < deadline:
            for process, name in ((alertmanager, "alertmanager"), (prometheus, "prometheus"), (sink, "sink")):
                assert process.poll() is None, (tmp_path / f"{name}.log").read_text()[-2000:]
            listing = _get(f"http://127.0.0.1:{sink_port}/")[1]
            if "AutoresearchAlertingHeartbeat" in listing and "AutoresearchDaemonDown" in listing:
                break
            time.sleep(1)
        health = _get(f"http://127.0.0.1:{sink_port}/healthz")
        forwarded = chat.get(timeout=30)
    finally:
        _stop(prometheus)
        _stop(alertmanager)
        _stop(sink)
        sink_log.close()
    lines = listing.splitlines()
    assert any(" heartbeat firing AutoresearchAlertingHeartbeat heartbeat " in f" {line} " for line in lines), listing
    assert any(" critical firing AutoresearchDaemonDown critical " in f" {line} " for line in lines), listing
    assert health[0] == 200 and health[1].startswith("heartbeat"), health
    assert "AutoresearchDaemonDown" in forwarded["text"] and "Heartbeat" not in forwarded["text"]
    logged = [json.loads(line) for line in (tmp_path / "sink.log").read_text().splitlines() if line.startswith("{")]
    assert {"receiver": "critical", "alertname": "AutoresearchDaemonDown"}.items() <= next(
        entry for entry in logged if entry.get("alertname") == "AutoresearchDaemonDown").items()
