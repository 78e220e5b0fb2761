"""A real Prometheus scrapes the daemon's endpoint over TLS with basic auth (web-config file, exporter-toolkit
format): the right credentials give `up == 1` and the daemon's samples; a wrong password or plain HTTP give `up == 0`."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.ops.http import Heartbeat, start_http_server
from daemon.ops.metrics import Metrics
from tests.pgcluster import free_port
from tests.tlsfiles import web_config

pytestmark = pytest.mark.prometheus


def _query(prom_port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return list(json.loads(response.read())["data"]["result"])
    except OSError:
        return []


def test_prometheus_scrapes_over_tls_with_basic_auth_and_is_refused_without(tmp_path: Path) -> None:
    """Job `good` (https, CA, right password) is up with the daemon's metrics; `badpass` and `plain` are down."""
    config_dir = tmp_path / "web"
    config_dir.mkdir()
    metrics = Metrics(training_budget_s=300.0)
    heartbeat = Heartbeat(60)
    heartbeat.beat()
    server = start_http_server("127.0.0.1", 0, metrics.registry, db_ping=lambda: True, heartbeat=heartbeat,
                               web_config=web_config(config_dir, {"prometheus": "s3cret"}))
    target = [{"targets": [f"127.0.0.1:{server.port}"]}]
    tls = {"ca_file": str(config_dir / "server.crt")}
    (tmp_path / "password").write_text("s3cret\n")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {"job_name": "good", "scheme": "https", "tls_config": tls, "static_configs": target,
             "basic_auth": {"username": "prometheus", "password_file": str(tmp_path / "password")}},
            {"job_name": "badpass", "scheme": "https", "tls_config": tls, "static_configs": target,
             "basic_auth": {"username": "prometheus", "password": "guess"}},
            {"job_name": "plain", "scheme": "http", "static_configs": target,
             "basic_auth": {"username": "prometheus", "password": "s3cret"}},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    prometheus = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}",
                                   f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                                  stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        up: dict[str, str] = {}
        budget: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            up = {r["metric"]["job"]: r["value"][1] for r in _query(prom_port, "up")}
            budget = _query(prom_port, 'autoresearch_training_budget_seconds{job="good"}')
            if len(up) == 3 and budget:
                break
            time.sleep(1)
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        log.close()
        server.close()
    assert up == {"good": "1", "badpass": "0", "plain": "0"}, up
    assert budget and budget[0]["value"][1] == "300"
