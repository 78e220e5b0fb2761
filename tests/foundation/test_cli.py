"""The `autoresearch` console script: help, error reporting, and `doctor`."""

from __future__ import annotations

from pathlib import Path

import pytest

COMMANDS = ("init", "prepare", "run", "once", "status", "experiments", "best", "report", "reap", "doctor", "try", "db")


def test_help_lists_every_command(run_cli) -> None:
    """`autoresearch --help` names every command."""
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in COMMANDS:
        assert f"    {command}" in proc.stdout


def test_bad_config_exits_2_with_one_line(run_cli, tmp_path: Path) -> None:
    """A bad config value is a one-line error on stderr and exit status 2, with no traceback."""
    (tmp_path / "autoresearch.toml").write_text("[metrics]\nport = 99999\n")
    proc = run_cli("status")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: config 'autoresearch.toml': metrics.port = 99999: "
        "Input should be less than or equal to 65535"
    ]


def test_unknown_env_override_exits_2(run_cli) -> None:
    """A misspelt AUTORESEARCH_* variable is refused the same way."""
    proc = run_cli("status", env={"AUTORESEARCH_JUDGE__NOISE": "3"})
    assert proc.returncode == 2
    assert "unknown key 'judge.noise'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.docker
def test_doctor_prints_a_table_with_a_verdict(run_cli, tmp_path: Path) -> None:
    """`doctor` prints one row per check with how to fix it, and an overall verdict."""
    proc = run_cli("doctor", env={"AUTORESEARCH_METRICS__PORT": "0"})
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["check", "verdict", "detail", "how", "to", "fix"]
    names = {line.split("  ")[0].strip() for line in lines[2:] if line and not line.startswith("verdict")}
    assert {"python", "torch", "docker engine", "database", "metrics port", "api key"} <= names
    assert lines[-1].startswith("verdict: ")
    # On this machine: CPU torch (warn), Docker answers, the workspace is not initialised yet.
    assert "docker engine  ok" in proc.stdout
    assert "autoresearch init" in proc.stdout
    assert proc.returncode == (1 if "NOT READY" in lines[-1] else 0)


def test_doctor_fails_when_anthropic_is_forced_without_key(run_cli) -> None:
    """Forcing the anthropic provider without a key is a failed check with the variable to set."""
    proc = run_cli("doctor", env={"AUTORESEARCH_AGENT__PROVIDER": "anthropic", "AUTORESEARCH_METRICS__PORT": "0"})
    assert proc.returncode == 1
    assert "AUTORESEARCH_AGENT__API_KEY_FILE" in proc.stdout
    assert "NOT READY" in proc.stdout


def test_db_upgrade_then_current_on_a_fresh_workspace(run_cli, tmp_path: Path) -> None:
    """`init` then `db upgrade` migrates the SQLite database; `db current` then says it is current."""
    workspace = tmp_path / "ws"
    env = {"AUTORESEARCH_WORKSPACE": str(workspace), "AUTORESEARCH_METRICS__PORT": "0"}
    assert run_cli("init", str(workspace), env=env).returncode == 0
    upgraded = run_cli("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    current = run_cli("db", "current", env=env)
    assert current.returncode == 0
    revision = current.stdout.split()[1]
    assert current.stdout.startswith(f"schema {revision} (code wants {revision})")
    assert "run `autoresearch db upgrade`" not in current.stdout


def test_reap_on_a_clean_machine_reports_nothing_to_do(run_cli, tmp_path: Path) -> None:
    """`reap` with the local backend reconciles an empty database and says so in three lines."""
    workspace = tmp_path / "ws"
    env = {"AUTORESEARCH_WORKSPACE": str(workspace), "AUTORESEARCH_SANDBOX__BACKEND": "local",
           "AUTORESEARCH_METRICS__PORT": "0"}
    assert run_cli("init", str(workspace), env=env).returncode == 0
    reaped = run_cli("reap", env=env)
    assert reaped.returncode == 0, reaped.stderr
    assert reaped.stdout.splitlines() == [
        "reaped 0 sandbox run(s)",
        "interrupted 0 orphaned experiment(s): []",
        "requeued 0 experiment(s) with expired leases: []",
    ]
