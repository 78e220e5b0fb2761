"""Prometheus configuration and alert rules, checked and unit-tested by promtool."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
README = PROMETHEUS_DIR.parents[0] / "README.md"
# Every way a night fails (issue 23), a night whose noise is the machine's load, and the alert path's heartbeat.
REQUIRED_ALERTS = {
    "AutoresearchDaemonDown", "AutoresearchDaemonAbsent", "AutoresearchNoExperimentFinished",
    "AutoresearchSessionFailed", "AutoresearchConsecutiveCrashes", "AutoresearchGpuIdleInWindow",
    "AutoresearchDatabaseUnreachable", "AutoresearchDiskLow", "AutoresearchDiskAlmostFull",
    "AutoresearchAgentErrors", "AutoresearchGpuQuarantined", "AutoresearchCostCapReached",
    "AutoresearchNoImprovementTonight", "AutoresearchAlertingHeartbeat", "AutoresearchLoadSetsTheNoise",
}
ROUTED_SEVERITIES = {"critical", "warning", "info", "heartbeat"}

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


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
            for rule in group["rules"]]


def test_every_alert_but_the_heartbeat_has_a_quiet_unit_test() -> None:
    """alerts_test.yml also expects each alert silent somewhere (a rule never seen quiet may fire always)."""
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    quiet = {case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if not case["exp_alerts"]}
    assert quiet == REQUIRED_ALERTS - {"AutoresearchAlertingHeartbeat"}


def test_every_alert_has_a_summary_a_routed_severity_and_a_runbook_section() -> None:
    """Each rule: a summary, a severity Alertmanager routes, and a runbook link to a heading of deploy/README.md."""
    headings = {line.lstrip("#").strip().lower() for line in README.read_text().splitlines() if line.startswith("#")}
    for rule in _rules():
        name = rule["alert"]
        assert rule["annotations"]["summary"], name
        assert rule["labels"]["severity"] in ROUTED_SEVERITIES, name
        assert rule["annotations"]["runbook"] == f"deploy/README.md#{name.lower()}", name
        assert name.lower() in headings, f"no runbook section '### {name}' in deploy/README.md"


def test_only_the_heartbeat_always_fires() -> None:
    """The heartbeat's expression is constant; it is the only rule that is, and the only one with its severity."""
    heartbeat = [rule for rule in _rules() if rule["labels"]["severity"] == "heartbeat"]
    assert [rule["alert"] for rule in heartbeat] == ["AutoresearchAlertingHeartbeat"]
    assert heartbeat[0]["expr"].strip() == "vector(1)" and "for" not in heartbeat[0]
