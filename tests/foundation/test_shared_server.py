"""A shared lab server: set-up and the suite leave other people's Postgres and Prometheus as they were.

A bystander Postgres cluster and a process named `prometheus` run before set-up's services step and a
nested run of the tests that restart Postgres and start Prometheus/Alertmanager; both are alive with the
same PIDs afterwards. The suite's own cluster is stopped even when pytest is killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.pgcluster import PgCluster, PgClusterError, pg_bin_dir

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

HOST_PIDFILES = sorted(Path("/var/run/postgresql").glob("*.pid")) if Path("/var/run/postgresql").is_dir() else []
NESTED_TESTS = ("tests/store/test_retry.py::test_postgres_restart_mid_write_loop",
                "tests/deploy/test_prometheus_rules.py",
                "tests/deploy/test_alert_delivery.py")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split(") ", 1)[1][0] != "Z"


def _start_time(pid: int) -> str:
    """Process start time (clock ticks since boot): a PID reused by another process reads differently."""
    return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()[19]


def _pids_of_host_clusters() -> dict[str, int]:
    pids: dict[str, int] = {}
    for pidfile in HOST_PIDFILES:
        text = pidfile.read_text().split()
        if text and text[0].isdigit() and _alive(int(text[0])):
            pids[str(pidfile)] = int(text[0])
    return pids


@pytest.fixture()
def bystander_cluster() -> Iterator[PgCluster]:
    """Someone else's Postgres: a throwaway cluster of its own, started before set-up and the nested suite."""
    if pg_bin_dir() is None:
        pytest.skip("no PostgreSQL server binaries")
    cluster = PgCluster("bystander-pg")
    try:
        cluster.start()
    except PgClusterError:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture()
def bystander_prometheus(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Someone else's process named `prometheus` (a renamed copy of `sleep`)."""
    binary = tmp_path / "prometheus"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", binary)
    process = subprocess.Popen([str(binary), "3600"], start_new_session=True)
    yield process
    process.kill()
    process.wait(timeout=10)


def test_setup_and_suite_leave_a_foreign_postgres_and_prometheus_untouched(
        bystander_cluster: PgCluster, bystander_prometheus: subprocess.Popen[bytes]) -> None:
    """set-up's services step and the Postgres-restarting, Prometheus-starting tests keep both bystanders' PIDs."""
    pg_pid = bystander_cluster.postmaster_pid()
    assert pg_pid is not None
    before = {pid: _start_time(pid) for pid in (pg_pid, bystander_prometheus.pid, *_pids_of_host_clusters().values())}
    setup = subprocess.run(["bash", "scripts/setup.sh", "services"], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=900, check=False)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("AUTORESEARCH_TEST_PG", "PYTEST_ADDOPTS")}
    nested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *NESTED_TESTS],
                            cwd=REPO_ROOT, env={**env, "CI": "true"}, capture_output=True, text=True, timeout=900,
                            check=False)
    assert nested.returncode == 0, nested.stdout[-4000:] + nested.stderr[-2000:]
    assert "skipped" not in nested.stdout.splitlines()[-1], nested.stdout[-2000:]
    after = {pid: _start_time(pid) for pid in before if _alive(pid)}
    assert after == before, f"a process that belongs to someone else was stopped or restarted: {before} -> {after}"
    assert bystander_cluster.postmaster_pid() == pg_pid


def test_a_killed_pytest_leaves_no_postgres_behind(tmp_path: Path) -> None:
    """The suite's cluster is stopped and its directory removed even when its owner is SIGKILLed."""
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from tests.pgcluster import PgCluster; "
              "c = PgCluster('killed-owner').start(); print(c.postmaster_pid(), c.root, flush=True); time.sleep(600)")
    owner = subprocess.Popen([sys.executable, "-c", script, str(REPO_ROOT)], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    pid_text, root = owner.stdout.readline().split()
    postmaster = int(pid_text)
    assert _alive(postmaster)
    owner.send_signal(signal.SIGKILL)
    owner.wait(timeout=10)
    deadline = time.monotonic() + 90
    while (_alive(postmaster) or Path(root).exists()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(postmaster), "the postmaster outlived its owner"
    assert not Path(root).exists(), "the cluster's directory was left behind"


def test_setup_never_touches_a_running_dockerd_that_does_not_answer(tmp_path: Path) -> None:
    """`docker info` fails but a dockerd runs (its pidfile names a live process): set-up says so, starts
    no second engine and leaves the running one alone."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "dockerd-started"
    (bin_dir / "docker").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "dockerd").write_text(f"#!/bin/sh\ntouch {marker}\n")
    for tool in ("docker", "dockerd"):
        (bin_dir / tool).chmod(0o755)
    engine = subprocess.Popen(["sleep", "600"])
    pidfile = tmp_path / "docker.pid"
    pidfile.write_text(f"{engine.pid}\n")
    try:
        done = subprocess.run(["bash", "scripts/setup.sh", "docker"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=60, check=False,
                              env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                                   "DOCKERD_PIDFILE": str(pidfile)})
        assert done.returncode != 0
        assert f"a dockerd is running (pid {engine.pid})" in done.stdout and "not touching it" in done.stdout
        assert not marker.exists(), "a second dockerd was started"
        assert _alive(engine.pid)
    finally:
        engine.kill()
        engine.wait()
