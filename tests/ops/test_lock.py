"""One daemon per database and instance: the lock, owner ids that survive PID namespaces and PID reuse."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.service.lock import AlreadyRunning, DaemonLock
from sandbox import labels as L
from tests.conftest import REPO_ROOT
from tests.e2e.support import empty_database
from tests.pgcluster import PgCluster, wait_ready

# A lock holder in another process: prints its owner id, then holds the lock until killed.
HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from daemon.service.lock import DaemonLock
from sandbox.labels import owner_id
lock = DaemonLock(sys.argv[2], sys.argv[3])
owner = owner_id(sys.argv[3])
lock.acquire(owner)
print(owner, flush=True)
time.sleep(600)
"""


def _url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'autoresearch.db'}"
    return empty_database(request.getfixturevalue("postgres_url"))


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _url(request.param, tmp_path, request)


@pytest.fixture()
def holder(url: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Another process holding the lock for instance `lab-1`: (the process, its owner id)."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(REPO_ROOT), url, "lab-1"], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout is not None
    owner = process.stdout.readline().strip()
    assert owner.startswith("lab-1:"), "the holder did not take the lock"
    yield process, owner
    process.kill()
    process.wait(timeout=30)


def test_second_lock_on_the_same_database_and_instance_is_refused(url: str) -> None:
    """A second acquire for the same instance raises AlreadyRunning naming the holder."""
    first, second = DaemonLock(url, "lab-1"), DaemonLock(url, "lab-1")
    first.acquire(L.owner_id("lab-1"))
    try:
        with pytest.raises(AlreadyRunning, match="another autoresearch daemon already runs") as caught:
            second.acquire("lab-1:999-1-x-y")
        assert L.owner_id("lab-1").rpartition(":")[2] in str(caught.value)
    finally:
        first.release()
        second.release()


@pytest.mark.postgres
def test_another_instance_is_not_refused(postgres_url: str) -> None:
    """Two instances (two servers) may share one Postgres database: each has a lock of its own."""
    url = empty_database(postgres_url)
    first, second = DaemonLock(url, "lab-1"), DaemonLock(url, "lab-2")
    first.acquire("lab-1:1-1-a-b")
    try:
        second.acquire("lab-2:1-1-a-b")
    finally:
        first.release()
        second.release()


def test_released_lock_can_be_taken_again(url: str) -> None:
    """After release (or the holder's exit), the next daemon gets the lock."""
    first = DaemonLock(url, "lab-1")
    first.acquire("lab-1:1-1-a-b")
    first.release()
    second = DaemonLock(url, "lab-1")
    second.acquire("lab-1:2-2-c-d")
    assert second.holder() == "lab-1:2-2-c-d"
    second.release()
    assert DaemonLock(url, "lab-1").holder() is None


def test_holder_of_another_process_is_named_and_alive(holder: tuple[subprocess.Popen[str], str], url: str) -> None:
    """holder() names the other process' owner id; owner_alive says yes for it, no for any other id."""
    _process, owner = holder
    probe = DaemonLock(url, "lab-1")
    assert probe.holder() == owner
    assert probe.owner_alive(owner)
    assert not probe.owner_alive("lab-1:" + "-".join(["1", "2", "3", "4"]))


def test_killed_holder_frees_the_lock(holder: tuple[subprocess.Popen[str], str], url: str) -> None:
    """SIGKILL of the holder frees the lock (the kernel closes its file / Postgres its session)."""
    process, owner = holder
    process.kill()
    process.wait(timeout=30)
    lock = DaemonLock(url, "lab-1")
    deadline = time.monotonic() + 30
    while lock.holder() is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    lock.acquire("lab-1:5-5-e-f")
    assert not lock.owner_alive(owner)
    lock.release()


def test_cli_once_beside_a_holder_refuses_with_a_clear_message(
        holder: tuple[subprocess.Popen[str], str], url: str, tmp_path: Path, run_cli) -> None:
    """`autoresearch once` while another process holds the lock exits 8 (locked) and names the holder; nothing runs."""
    _process, owner = holder
    from daemon.research.workspace import Workspace

    workspace = Workspace.init(tmp_path / "ws", baseline_source="print('hi')\n")
    env = {"AUTORESEARCH_DATABASE__URL": url, "AUTORESEARCH_INSTANCE": "lab-1",
           "AUTORESEARCH_WORKSPACE": str(workspace.root), "AUTORESEARCH_SANDBOX__BACKEND": "local",
           "AUTORESEARCH_METRICS__PORT": "0", "PATH": os.environ["PATH"]}
    done = run_cli("once", "-n", "0", env=env, cwd=workspace.root)
    assert done.returncode == 8, done.stdout + done.stderr
    scope = "" if url.startswith("sqlite") else " for instance 'lab-1'"
    assert f"another autoresearch daemon already runs{scope} on this database" in done.stderr
    assert owner in done.stderr
    assert not (workspace.root / "results.tsv").exists() or len(
        (workspace.root / "results.tsv").read_text().splitlines()) <= 1


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_owner_in_another_pid_namespace_is_alive_through_the_lock(url: str) -> None:
    """A holder in its own PID namespace (pid 1 there) is alive by the lock, though its PID means nothing here."""
    process = subprocess.Popen(["unshare", "--pid", "--kill-child", "--mount-proc", sys.executable, "-c", HOLDER,
                                str(REPO_ROOT), url, "lab-1"], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    try:
        owner = process.stdout.readline().strip()
        assert owner.startswith("lab-1:1-"), f"not pid 1 of a new namespace: {owner!r}"
        assert not L.owner_alive_here(owner), "the PID fallback cannot see into another namespace"
        assert DaemonLock(url, "lab-1").owner_alive(owner)
    finally:
        process.kill()
        process.wait(timeout=30)


@pytest.mark.postgres
def test_lock_is_taken_again_after_a_postgres_restart(postgres_url: str, postgres_cluster: PgCluster) -> None:
    """A restart drops the advisory lock with its session; the watcher takes it again and nothing is lost."""
    url = empty_database(postgres_url)
    lock = DaemonLock(url, "lab-1", recheck_s=0.2)
    lock.acquire("lab-1:7-7-a-b")
    try:
        restarted = postgres_cluster.restart()
        assert restarted.returncode == 0, restarted.stderr
        wait_ready(url)
        deadline = time.monotonic() + 60
        while DaemonLock(url, "lab-1").holder() != "lab-1:7-7-a-b" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert DaemonLock(url, "lab-1").holder() == "lab-1:7-7-a-b"
        assert not lock.lost.is_set()
        with pytest.raises(AlreadyRunning):
            DaemonLock(url, "lab-1").acquire("lab-1:8-8-c-d")
    finally:
        lock.release()


def test_owner_id_names_pid_start_time_boot_and_a_random_part() -> None:
    """This process' owner id: `<instance>:<pid>-<start ticks>-<boot id>-<random>`, stable for the process."""
    owner = L.owner_id("lab-1")
    pid, started, booted, rand = owner.removeprefix("lab-1:").split("-")
    assert int(pid) == os.getpid() and started == L.start_ticks(os.getpid()) and booted == L.boot_id()
    assert len(rand) == 8 and L.owner_id("lab-1") == owner
    assert L.owner_alive_here(owner)


def test_reused_pid_reads_as_dead() -> None:
    """An owner id whose PID now belongs to another process (other start time) is dead."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        real = f"lab-1:{sleeper.pid}-{L.start_ticks(sleeper.pid)}-{L.boot_id()}-abcdef12"
        reused = f"lab-1:{sleeper.pid}-{int(L.start_ticks(sleeper.pid)) - 1}-{L.boot_id()}-abcdef12"
        rebooted = f"lab-1:{sleeper.pid}-{L.start_ticks(sleeper.pid)}-00000000-abcdef12"
        assert L.owner_alive_here(real)
        assert not L.owner_alive_here(reused)
        assert not L.owner_alive_here(rebooted)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("owner", ["", "lab-1", "lab-1:", "lab-1:abc", "lab-1:1-2-3", "lab-1:x-1-2-3"])
def test_malformed_owner_ids_read_as_dead(owner: str) -> None:
    """An owner label that does not parse is never taken for a live daemon."""
    assert not L.owner_alive_here(owner)
