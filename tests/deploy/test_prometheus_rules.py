"""Prometheus configuration and alert rules, checked and unit-tested by promtool."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
REQUIRED_ALERTS = {
    "AutoresearchDaemonDown", "AutoresearchNoExperimentFinished", "AutoresearchConsecutiveCrashes",
    "AutoresearchGpuQuarantined", "AutoresearchCostCapReached", "AutoresearchNoImprovementTonight",
}

pytestmark = pytest.mark.prometheus


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, check=False,
                          timeout=120)


def test_config_is_valid_and_scrapes_the_default_metrics_port() -> None:
    """promtool accepts prometheus.yml, which scrapes the daemon's default 127.0.0.1:9464."""
    done = _promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "autoresearch")
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9464"]


def test_rules_are_valid_and_cover_every_required_alert() -> None:
    """promtool accepts alerts.yml, and it defines each alert the deployment promises."""
    done = _promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert names == REQUIRED_ALERTS


def test_alert_rule_unit_tests_pass() -> None:
    """promtool test rules: every alert fires when it should and stays quiet when it should not."""
    done = _promtool("test", "rules", "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_firing_unit_test() -> None:
    """alerts_test.yml expects each alert to fire at least once (a rule never seen firing is untested)."""
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    assert fired == REQUIRED_ALERTS
