"""A throwaway PostgreSQL cluster owned by the test suite: initdb in a temp dir, a free port on 127.0.0.1.

The host's own Postgres (127.0.0.1:5432 on a lab server) is never touched: the suite starts this cluster,
restarts only this one, and stops it at the end. A watcher process stops it too if pytest dies without
running its teardown (SIGKILL, OOM), so no orphan postmaster is left behind on a shared machine.

`initdb` and `postgres` refuse to run as root; as root, both run as the unprivileged `postgres` user
(override with AUTORESEARCH_TEST_PG_USER), in a temp dir that user owns.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PG_BIN_CANDIDATES = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin")

# Runs detached: waits for the pytest process to exit, then stops the cluster and removes its directory.
_WATCHER = """
import os, shutil, subprocess, sys, time
pid, cmd, root = int(sys.argv[1]), sys.argv[2:-1], sys.argv[-1]
while True:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        break
    except PermissionError:
        pass
    if not os.path.isdir(root):
        sys.exit(0)
    time.sleep(1)
subprocess.run(cmd, capture_output=True, timeout=60, check=False)
shutil.rmtree(root, ignore_errors=True)
"""


class PgClusterError(RuntimeError):
    """The suite's cluster could not be created or started (the message says why)."""


def pg_bin_dir() -> Path | None:
    """The directory holding initdb/pg_ctl/postgres, or None when PostgreSQL's server binaries are absent."""
    override = os.environ.get("AUTORESEARCH_TEST_PG_BIN")
    for candidate in ([override] if override else []) + list(PG_BIN_CANDIDATES):
        if (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgCluster:
    """One Postgres cluster in a temp dir; `start`, `restart`, `stop`; `admin_url` for the `postgres` database."""

    def __init__(self, name: str = "autoresearch-test-pg") -> None:
        bindir = pg_bin_dir()
        if bindir is None:
            raise PgClusterError("no PostgreSQL server binaries (initdb, pg_ctl): run `make services`")
        self.bindir = bindir
        self.user = self._run_as_user()
        self.root = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        self.datadir = self.root / "data"
        self.port = free_port()
        self._watcher: subprocess.Popen[bytes] | None = None
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.root.chmod(0o700)

    @staticmethod
    def _run_as_user() -> str | None:
        if os.geteuid() != 0:
            return None
        user = os.environ.get("AUTORESEARCH_TEST_PG_USER", "postgres")
        try:
            pwd.getpwnam(user)
        except KeyError as exc:
            raise PgClusterError(f"running as root and there is no user {user!r} to run initdb/postgres as: "
                                 "create an unprivileged user or set AUTORESEARCH_TEST_PG_USER") from exc
        return user

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _cmd(self, *args: str) -> list[str]:
        if self.user is None:
            return list(args)
        return ["runuser", "-u", self.user, "--", *args]

    def _pg_ctl(self, *args: str) -> list[str]:
        return self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args)

    def _check(self, argv: list[str], what: str, timeout: float = 120) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=self.root)
        if done.returncode != 0:
            log = self.root / "postgres.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise PgClusterError(f"{what} failed (rc={done.returncode}): {done.stderr.strip()}\n{tail}")

    def start(self) -> PgCluster:
        """initdb (first time) and start on 127.0.0.1:<port> with its socket in the temp dir; waits until ready."""
        if not self.datadir.exists():
            self._check(self._cmd(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                                  "--auth=trust", "--encoding=UTF8", "--no-instructions"),
                        "initdb")
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} "
                   "-c max_connections=200 -c fsync=off -c full_page_writes=off -c synchronous_commit=off")
        self._check(self._pg_ctl("-w", "-t", "60", "-l", str(self.root / "postgres.log"), "-o", options, "start"),
                    "pg_ctl start")
        self._start_watcher()
        return self

    def restart(self) -> subprocess.CompletedProcess[str]:
        """Restart this cluster only (fast shutdown: open connections are cut), waiting until it accepts again."""
        # -l again: without it the new postmaster would write to (and hold open) this call's pipes
        return subprocess.run(self._pg_ctl("-w", "-t", "60", "-m", "fast", "-l", str(self.root / "postgres.log"),
                                           "restart"),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False,
                              cwd=self.root)

    def postmaster_pid(self) -> int | None:
        pidfile = self.datadir / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(pidfile.read_text().splitlines()[0])
        return None

    def stop(self) -> None:
        """Stop the cluster (immediate shutdown) and remove its directory; safe to call twice."""
        if self.datadir.exists():
            subprocess.run(self._pg_ctl("-m", "immediate", "-w", "stop"), capture_output=True, timeout=60,
                           check=False, cwd="/")
        shutil.rmtree(self.root, ignore_errors=True)
        if self._watcher is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watcher.wait(timeout=5)
            self._watcher = None

    def _start_watcher(self) -> None:
        if self._watcher is not None:
            return
        stop = self._pg_ctl("-m", "immediate", "-w", "stop")
        self._watcher = subprocess.Popen(
            [sys.executable, "-c", _WATCHER, str(os.getpid()), *stop, str(self.root)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, cwd="/")


def wait_ready(url: str, timeout: float = 30) -> None:
    """Block until a connection to `url` succeeds (after a restart)."""
    import sqlalchemy

    deadline = time.monotonic() + timeout
    while True:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("select 1"))
            return
        except sqlalchemy.exc.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        finally:
            engine.dispose()
