"""The CLI for people and scripts: global options anywhere, --version, --json, config discovery, and `status`
asking a real running daemon (`autoresearch run`) over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon import __version__
from daemon.config import load_settings
from daemon.errors import ConfigError
from daemon.research.workspace import Workspace
from tests.conftest import REPO_ROOT
from tests.pgcluster import free_port


def _env(workspace: Path, **extra: str) -> dict[str, str]:
    return {"AUTORESEARCH_WORKSPACE": str(workspace), "AUTORESEARCH_SANDBOX__BACKEND": "local",
            "PATH": os.environ["PATH"], **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}, **extra}


def test_version(run_cli) -> None:
    """--version prints the package version and exits 0."""
    done = run_cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"autoresearch {__version__}"


@pytest.mark.parametrize("argv", [
    ("--workspace", "{ws}", "--json", "experiments"),
    ("experiments", "--workspace", "{ws}", "--json"),
    ("--json", "experiments", "--workspace", "{ws}"),
])
def test_global_options_work_before_and_after_the_subcommand(run_cli, tmp_path: Path, argv: tuple[str, ...]) -> None:
    """--workspace and --json are accepted on either side of the subcommand, with the same result."""
    workspace = Workspace.init(tmp_path / "ws", baseline_source="print(1)\n")
    assert run_cli("--workspace", str(workspace.root), "db", "upgrade").returncode == 0
    done = run_cli(*(a.format(ws=workspace.root) for a in argv), env={"PATH": os.environ["PATH"]})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_option_after_the_subcommand_overrides_none_given_before(run_cli, tmp_path: Path) -> None:
    """A --config after the subcommand is used (it is not reset by the subcommand's defaults)."""
    config = tmp_path / "elsewhere.toml"
    config.write_text("[metrics]\nport = 99999\n")
    done = run_cli("status", "--config", str(config))
    assert done.returncode == 2 and "metrics.port = 99999" in done.stderr


def test_json_on_a_command_without_it_is_a_clear_error(run_cli) -> None:
    """--json with a command that has no JSON output says which commands have it."""
    done = run_cli("reap", "--json")
    assert done.returncode == 2
    assert "--json is not supported by `reap`" in done.stderr and "status, experiments, best, report" in done.stderr


def test_config_from_autoresearch_config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AUTORESEARCH_CONFIG names the config file; a missing one is an error, not silently ignored."""
    config = tmp_path / "conf.toml"
    config.write_text("instance = 'from-env'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTORESEARCH_CONFIG", str(config))
    assert load_settings().instance == "from-env"
    monkeypatch.setenv("AUTORESEARCH_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings()


def test_system_config_is_found_when_no_local_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/etc/autoresearch/autoresearch.toml is read when there is no ./autoresearch.toml (a local one wins)."""
    import daemon.config as config_module

    system = tmp_path / "etc.toml"
    system.write_text("instance = 'system'\n")
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG_PATH", system)
    monkeypatch.delenv("AUTORESEARCH_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert load_settings().instance == "system"
    (tmp_path / "autoresearch.toml").write_text("instance = 'local'\n")
    assert load_settings().instance == "local"


def test_status_without_a_daemon_exits_3(run_cli, tmp_path: Path) -> None:
    """No daemon answers: status says so and exits 3, and --json says `not running`."""
    workspace = Workspace.init(tmp_path / "ws", baseline_source="print(1)\n")
    port = str(free_port())
    done = run_cli("status", "--json", env=_env(workspace.root, AUTORESEARCH_METRICS__PORT=port))
    assert done.returncode == 3, done.stderr
    data = json.loads(done.stdout)
    assert data["state"] == "not running" and data["url"] == f"http://127.0.0.1:{port}"
    assert "24 h" in data["tonight"]["meaning"]


def test_status_url_needs_no_readable_config(run_cli, tmp_path: Path) -> None:
    """status --url works even when the config cannot be loaded (a researcher without access to it)."""
    done = run_cli("status", "--url", f"http://127.0.0.1:{free_port()}", "--config", str(tmp_path / "nope.toml"))
    assert done.returncode == 3 and "daemon: not running" in done.stdout


@dataclass
class Daemon:
    workspace: Path
    url: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def running_daemon(tmp_path_factory: pytest.TempPathFactory, prepared_data: Path,
                   baseline_source: str) -> Iterator[Daemon]:
    """`autoresearch run` (SQLite, local sandbox, no window) in the background, answering on a free port."""
    root = tmp_path_factory.mktemp("daemon")
    workspace = Workspace.init(root / "ws", baseline_source=baseline_source)
    port = free_port()
    env = _env(workspace.root, AUTORESEARCH_METRICS__PORT=str(port), AUTORESEARCH_DATA__DIR=str(prepared_data),
               AUTORESEARCH_INSTANCE="lab-status", AUTORESEARCH_TRAINING__PRESET="tiny",
               AUTORESEARCH_TRAINING__PROBE_FLOOR="false")  # the test corpus's val split is below the probe's floor
    exe = REPO_ROOT / ".venv" / "bin" / "autoresearch"
    log = (root / "daemon.log").open("w")
    process = subprocess.Popen([str(exe), "run"], cwd=workspace.root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, (root / "daemon.log").read_text()[-3000:]
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    yield Daemon(workspace.root, url, env)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    log.close()


def test_status_of_a_running_daemon_shows_lanes_and_tonight(running_daemon: Daemon, run_cli) -> None:
    """status exits 0 and shows the daemon, its lane with its GPU column, and what 'tonight' means."""
    done = run_cli("status", env=running_daemon.env, cwd=running_daemon.workspace)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"daemon: running at {running_daemon.url} (ok)" in done.stdout
    assert "instance lab-status" in done.stdout
    assert "lanes:" in done.stdout and "cpu" in done.stdout
    assert "tonight = since" in done.stdout


def test_status_json_of_a_running_daemon(running_daemon: Daemon, run_cli) -> None:
    """--json: state running, the lanes with gpu_uuid/gpu_index, the owner id, cost since a stated time."""
    done = run_cli("--json", "status", env=running_daemon.env, cwd=running_daemon.workspace)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["state"] == "running" and data["health"] == "ok"
    assert data["lanes"] == [{"lane": "cpu", "gpu_uuid": None, "gpu_index": None, "state": "idle",
                              "experiment_id": None, "description": "", "reason": "", "since": None}]
    assert data["daemon"]["owner"].startswith("lab-status:")
    assert data["cost"]["since"] == data["tonight"]["since"]
    assert data["session"] is None


def test_status_json_is_served_over_http_without_secrets(running_daemon: Daemon) -> None:
    """/status.json answers JSON for anyone who can reach the port; it carries no config or database URL."""
    with urllib.request.urlopen(f"{running_daemon.url}/status.json", timeout=10) as answer:
        assert answer.headers["Content-Type"] == "application/json"
        text = answer.read().decode()
    assert "sqlite" not in text and "database" not in text
    assert json.loads(text)["daemon"]["instance"] == "lab-status"


def test_status_url_reads_the_daemon_with_no_config(running_daemon: Daemon, run_cli, tmp_path: Path) -> None:
    """status --url from anywhere (no workspace, no config) shows the running daemon."""
    done = run_cli("status", "--url", running_daemon.url, cwd=tmp_path)
    assert done.returncode == 0 and "instance lab-status" in done.stdout


def test_once_beside_the_running_daemon_refuses(running_daemon: Daemon, run_cli) -> None:
    """A second daemon (`once`) on the same database and instance exits 8 naming the holder and its version."""
    from daemon import __version__

    done = run_cli("once", "-n", "0", env=running_daemon.env, cwd=running_daemon.workspace)
    assert done.returncode == 8
    assert "another autoresearch daemon already runs on this database (held by lab-status:" in done.stderr
    assert f", version {__version__})" in done.stderr


def test_db_upgrade_beside_the_running_daemon_refuses(running_daemon: Daemon, run_cli) -> None:
    """`db upgrade` never migrates under a running daemon: it takes the daemon's lock and is refused (exit 8)."""
    done = run_cli("db", "upgrade", env=running_daemon.env, cwd=running_daemon.workspace)
    assert done.returncode == 8
    assert "held by lab-status:" in done.stderr
