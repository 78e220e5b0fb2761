"""systemd integration: STOPPING=1 as soon as SIGTERM arrives, a watchdog that catches a hung main loop within
WatchdogSec, and restart limits that outlast a short database outage."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from daemon.ops.http import Heartbeat
from daemon.research.workspace import Workspace
from daemon.service.notify import SystemdNotifier
from daemon.service.serve import loop_alive
from daemon.store import open_store
from tests.conftest import REPO_ROOT
from tests.pgcluster import free_port

UNIT = REPO_ROOT / "deploy" / "systemd" / "autoresearch.service"


def _unit_settings() -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings[key.strip()] = value.strip()
    return settings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_restart_limits_outlast_a_ten_minute_database_outage() -> None:
    """Failing at once on every start, the daemon is restarted for 9+ minutes before systemd gives up."""
    unit = _unit_settings()
    burst, interval, delay = int(unit["StartLimitBurst"]), int(unit["StartLimitIntervalSec"]), int(unit["RestartSec"])
    assert (burst - 1) * delay >= 540, "a few minutes of Postgres outage would leave the service dead"
    assert interval >= burst * delay, "the limit must count the failures of one outage together"
    assert unit["Restart"] == "on-failure"


def test_watchdog_rule_follows_watchdogsec_not_the_healthz_limit() -> None:
    """A loop silent for longer than the ping interval is not alive for the watchdog, though /healthz still is."""
    clock = Clock()
    heartbeat = Heartbeat(max_age_s=300, monotonic=clock)
    assert not loop_alive(heartbeat, 60.0), "no beat yet"
    heartbeat.beat()
    clock.now += 59
    assert loop_alive(heartbeat, 60.0)
    clock.now += 2
    assert not loop_alive(heartbeat, 60.0) and heartbeat.fresh()
    assert loop_alive(heartbeat, None), "without a systemd watchdog the /healthz limit applies"


def test_hung_loop_gets_no_watchdog_ping(tmp_path: Path) -> None:
    """Over a real notify socket: pings flow while the loop beats, stop while it hangs, resume after."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.2)
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                                             "WATCHDOG_USEC": "400000"})  # pings every 0.2 s
    heartbeat = Heartbeat(max_age_s=300)
    hung = False

    def beating() -> None:
        if not hung:
            heartbeat.beat()

    def pings(seconds: float) -> int:
        count, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            beating()
            with contextlib.suppress(TimeoutError):
                count += sock.recv(4096).decode().count("WATCHDOG=1")
        return count

    heartbeat.beat()
    pinger = notifier.start_watchdog(lambda: loop_alive(heartbeat, notifier.watchdog_interval_s))
    try:
        assert pings(1.5) >= 2
        hung = True
        pings(0.6)  # let the last beat age past the interval
        assert pings(1.5) == 0, "a hung loop must not be pinged for"
        hung = False
        assert pings(1.5) >= 2
    finally:
        pinger.stop()
        sock.close()


@pytest.fixture()
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(180)
    yield sock
    sock.close()


@pytest.mark.slow
def test_stopping_is_sent_when_sigterm_arrives_not_after_the_grace(
        tmp_path: Path, notify_socket: socket.socket, prepared_data: Path, baseline_source: str) -> None:
    """SIGTERM during a running experiment: STOPPING=1 arrives while the experiment still runs."""
    workspace = Workspace.init(tmp_path / "ws", baseline_source=baseline_source)
    now = datetime.now(timezone.utc)
    db = tmp_path / "ar.db"
    config = tmp_path / "autoresearch.toml"
    config.write_text(
        f'workspace = "{workspace.root}"\n[database]\nurl = "sqlite:///{db}"\n[data]\ndir = "{prepared_data}"\n'
        '[sandbox]\nbackend = "local"\n[training]\npreset = "tiny"\ntime_budget_s = 120\neval_tokens = 2048\nprobe_floor = false\n'
        '[agent]\nprovider = "offline"\n[judge]\nnoise_runs = 0\n'
        f'[metrics]\nport = {free_port()}\n[scheduler]\ngrace_s = 300\n'
        f'[[scheduler.windows]]\nname = "t"\ncron = "{now.minute} {now.hour} * * *"\nhours = 0.5\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env["NOTIFY_SOCKET"] = str(tmp_path / "notify.sock")
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen([str(REPO_ROOT / ".venv" / "bin" / "autoresearch"), "--config", str(config), "run"],
                              cwd=tmp_path, env=env, stdout=log, stderr=log)
    try:
        store = open_store(f"sqlite:///{db}")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-2000:]
            try:
                if store.list_experiments(status="running", limit=1):
                    break
            except Exception:  # schema not created yet
                pass
            time.sleep(0.3)
        else:
            pytest.fail("no experiment started")
        daemon.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in notify_socket.recv(4096).decode():
            pass
        running = store.list_experiments(status="running", limit=5)
        assert running, "STOPPING=1 came only after the running experiment had ended"
        store.close()
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)  # the second SIGTERM kills the run: no need to wait the grace
        daemon.wait(timeout=120)
        log.close()
    reports = list((workspace.reports_dir).glob("session-*/report.md"))
    assert len(reports) == 1, "the daemon writes the morning report when its session ends"


def test_config_error_exit_status_is_not_restarted() -> None:
    """The unit's RestartPreventExitStatus names ConfigError's exit status: a bad config does not restart 30 times."""
    from daemon.errors import ConfigError

    assert _unit_settings()["RestartPreventExitStatus"].split() == [str(ConfigError.exit_code)]


def test_config_error_really_exits_with_the_prevented_status(tmp_path: Path) -> None:
    """`autoresearch run` with an invalid config exits with the status the unit will not restart."""
    import sys

    config = tmp_path / "bad.toml"
    config.write_text("[metrics]\nport = 'not a port'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_") and k != "NOTIFY_SOCKET"}
    done = subprocess.run([sys.executable, "-m", "daemon", "--config", str(config), "run"], capture_output=True,
                          text=True, check=False, timeout=120, env=env)
    assert str(done.returncode) in _unit_settings()["RestartPreventExitStatus"].split(), done.stderr


def test_extend_timeout_sends_microseconds(tmp_path: Path) -> None:
    """extend_timeout(660) sends EXTEND_TIMEOUT_USEC=660000000 over the notify socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(5)
    try:
        assert SystemdNotifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}).extend_timeout(660)
        assert sock.recv(4096).decode() == "EXTEND_TIMEOUT_USEC=660000000"
    finally:
        sock.close()


def test_start_extensions_repeat_while_the_block_runs_and_stop_at_the_ceiling(tmp_path: Path) -> None:
    """extending_start pushes the timeout ahead repeatedly during a slow start-up, but never past max_total_s."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.05)
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    clock = Clock()
    messages: list[str] = []

    def drain() -> None:
        with contextlib.suppress(TimeoutError):
            while True:
                messages.append(sock.recv(4096).decode())

    try:
        with notifier.extending_start("migrating", step_s=0.3, max_total_s=100, monotonic=clock):
            deadline = time.monotonic() + 5
            while sum(m.startswith("EXTEND_TIMEOUT_USEC=") for m in messages) < 3 and time.monotonic() < deadline:
                drain()
            clock.now += 100  # the ceiling is reached: no more extensions, however long the block still runs
            time.sleep(0.3)
            drain()
            count = len(messages)
            time.sleep(0.5)
            drain()
            assert len(messages) == count, messages[count:]
    finally:
        sock.close()
    assert messages[0] == "STATUS=migrating"
    assert messages[1:4] == ["EXTEND_TIMEOUT_USEC=300000"] * 3


def test_daemon_extends_the_start_timeout_before_ready_and_the_stop_timeout_on_sigterm(
        tmp_path: Path, notify_socket: socket.socket, baseline_source: str, prepared_data: Path) -> None:
    """A real `autoresearch run`: EXTEND_TIMEOUT_USEC before READY=1, and on SIGTERM STOPPING=1 with the stop
    timeout extended to grace_s + 60 s."""
    import sys

    workspace = Workspace.init(tmp_path / "ws", baseline_source=baseline_source)
    config = tmp_path / "autoresearch.toml"
    config.write_text(
        f'workspace = "{workspace.root}"\n[database]\nurl = "sqlite:///{tmp_path / "ar.db"}"\n'
        f'[data]\ndir = "{prepared_data}"\n[sandbox]\nbackend = "local"\n[agent]\nprovider = "offline"\n'
        '[metrics]\nport = 0\n[scheduler]\ngrace_s = 420\n'
        '[training]\nprobe_floor = false\n')  # the test corpus's val split is below the probe's floor
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env["NOTIFY_SOCKET"] = str(tmp_path / "notify.sock")
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(config), "run"], cwd=tmp_path,
                              env=env, stdout=log, stderr=log)
    messages: list[str] = []

    def receive_until(text: str) -> None:
        notify_socket.settimeout(1)
        deadline = time.monotonic() + 120
        while not any(text in m for m in messages) and time.monotonic() < deadline:
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-2000:]
            with contextlib.suppress(TimeoutError):
                messages.append(notify_socket.recv(4096).decode())

    try:
        receive_until("READY=1")
        daemon.send_signal(signal.SIGTERM)
        receive_until("EXTEND_TIMEOUT_USEC=480000000")
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
        log.close()
    ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in messages[:ready]), messages
    stopping = next(i for i, m in enumerate(messages) if "STOPPING=1" in m)
    assert stopping > ready and "EXTEND_TIMEOUT_USEC=480000000" in messages[stopping + 1:], messages
