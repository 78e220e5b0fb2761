"""`autoresearch run` as a real subprocess: READY over NOTIFY_SOCKET, /healthz, experiments, SIGTERM once and twice."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from daemon.research.workspace import Workspace
from daemon.store import open_store
from tests.e2e.support import free_port

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
EXE = Path(os.sys.executable).parent / "autoresearch"
FINISHED = ("kept", "discarded", "measured", "crashed", "timeout", "oom", "invalid")


def _config(tmp_path: Path, workspace: Workspace, data: Path, db_url: str, port: int, *, backend: str | None) -> Path:
    """A TOML config whose only window opened this very minute (UTC) and lasts 3 minutes."""
    now = datetime.now(timezone.utc)
    sandbox = f'[sandbox]\nbackend = "{backend}"\n' if backend is not None else ""
    path = tmp_path / "autoresearch.toml"
    path.write_text(
        f'workspace = "{workspace.root}"\n'
        f'[database]\nurl = "{db_url}"\n'
        f'[data]\ndir = "{data}"\n'
        f"{sandbox}"
        '[training]\npreset = "tiny"\ntime_budget_s = 2\neval_tokens = 2048\nprobe_floor = false\n'
        '[agent]\nprovider = "offline"\n'
        "[judge]\nnoise_runs = 0\n"
        f'[metrics]\nhost = "127.0.0.1"\nport = {port}\n'
        "[scheduler]\ngrace_s = 120\n"
        f'[[scheduler.windows]]\nname = "test"\ncron = "{now.minute} {now.hour} * * *"\nhours = 0.05\n'
    )
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_") and k != "NOTIFY_SOCKET"}
    env.update(extra)
    return env


def _wait_for(what: str, check: Callable[[], bool], timeout_s: float, daemon: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if daemon.poll() is not None:
            pytest.fail(f"the daemon exited ({daemon.returncode}) while waiting for {what}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _healthz(port: int) -> int:
    try:
        return int(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


@pytest.fixture()
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(120)
    yield sock
    sock.close()


@pytest.fixture()
def daemon_run(tmp_path: Path, workspace: Workspace, prepared_data: Path, own_db: str,
               notify_socket: socket.socket) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`autoresearch run` with the local backend set explicitly, inside a window that just opened."""
    port = free_port()
    config = _config(tmp_path, workspace, prepared_data, own_db, port, backend="local")
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen([str(EXE), "--config", str(config), "run"], cwd=tmp_path, text=True,
                              env=_env(NOTIFY_SOCKET=str(tmp_path / "notify.sock")), stdout=log, stderr=log)
    try:
        yield daemon, port
    finally:
        if daemon.poll() is None:
            daemon.kill()
        daemon.wait(timeout=30)
        log.close()


def _messages(sock: socket.socket, until: str) -> list[str]:
    seen: list[str] = []
    while not any(until in message for message in seen):
        seen.append(sock.recv(4096).decode())
    return seen


def test_daemon_sends_ready_serves_health_runs_and_finishes_current_experiment_on_sigterm(
        daemon_run: tuple[subprocess.Popen[str], int], notify_socket: socket.socket, own_db: str) -> None:
    """READY, /healthz 200, experiments run in the open window; one SIGTERM lets the running one finish, exit 0."""
    daemon, port = daemon_run
    assert any("READY=1" in message for message in _messages(notify_socket, "READY=1"))
    _wait_for("/healthz 200", lambda: _healthz(port) == 200, 60, daemon)
    store = open_store(own_db)
    _wait_for("a kept baseline and a running candidate", lambda: bool(
        store.list_experiments(status="kept", limit=1) and store.list_experiments(status="running", limit=1)),
        180, daemon)
    running = store.list_experiments(status="running", limit=1)[0]
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=120) == 0
    assert any("STOPPING=1" in message for message in _messages(notify_socket, "STOPPING=1"))
    finished = store.get_experiment(running.id)
    assert finished is not None and finished.status in FINISHED, finished
    session = store.get_session(running.session_id)
    assert session is not None and session.status == "interrupted"
    assert not store.list_experiments(status=("running", "evaluating"), limit=5)


def test_second_sigterm_kills_the_running_experiment_and_exits_promptly(
        daemon_run: tuple[subprocess.Popen[str], int], notify_socket: socket.socket, own_db: str) -> None:
    """A second SIGTERM kills the running experiment (recorded `interrupted`) and the daemon exits 0 at once."""
    daemon, _port = daemon_run
    _messages(notify_socket, "READY=1")
    store = open_store(own_db)
    _wait_for("a running experiment", lambda: bool(store.list_experiments(status="running", limit=1)), 120, daemon)
    running = store.list_experiments(status="running", limit=1)[0]
    daemon.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
    killed = store.get_experiment(running.id)
    assert killed is not None and killed.status == "interrupted", killed
    assert not store.list_experiments(status=("running", "evaluating"), limit=5)


def test_daemon_refuses_without_docker_unless_local_is_explicit(
        tmp_path: Path, workspace: Workspace, prepared_data: Path, own_db: str) -> None:
    """With backend 'auto' and no Docker engine, `run` refuses and says how to proceed."""
    config = _config(tmp_path, workspace, prepared_data, own_db, free_port(), backend=None)
    done = subprocess.run([str(EXE), "--config", str(config), "run"], cwd=tmp_path, text=True, capture_output=True,
                          env=_env(DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock"), timeout=120, check=False)
    assert done.returncode != 0
    assert "will not run candidates without Docker isolation" in done.stderr
    assert "backend = 'local'" in done.stderr
