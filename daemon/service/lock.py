"""One daemon per database and instance: a lock every experiment-running command (`run`, `once`, `try`) holds.

Postgres: a session-level advisory lock on a dedicated connection, keyed by the instance name (advisory
locks are per database), with the holder's owner token as the connection's `application_name` so anyone
can see who holds it. SQLite: an exclusive `flock` on `<database file>.lock`, holding the owner id (one
daemon per SQLite file, whatever its instance name: a local file has one machine).
Both record the holder's program version beside its owner id, so a refusal names who holds the lock and
which version it runs (`db upgrade` takes the same lock: it never migrates under a running daemon).
Neither depends on PIDs, so the holder is known across PID namespaces (a daemon in a container, `reap`
on the host) and after PID reuse. A Postgres restart drops the lock with the connection: a watcher
thread takes it again; if another daemon took it meanwhile, `lost` is set and the owner must stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import threading
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.errors import AutoresearchError
from daemon.ops.logs import get_logger

log = get_logger("autoresearch.lock")
APP_PREFIX = "autoresearch "  # application_name = prefix + owner token (Postgres keeps 63 bytes)


class AlreadyRunning(AutoresearchError):
    """Another daemon (or `once`/`try`) holds this database's lock for the same instance."""

    exit_code = 8


def lock_key(instance: str) -> int:
    """The advisory lock's 64-bit key for `instance` (signed, as Postgres' bigint)."""
    digest = hashlib.sha256(f"autoresearch-daemon:{instance}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def owner_token(owner: str) -> str:
    """The part of an owner id after the instance: `<pid>-<start>-<boot>-<random>`."""
    return owner.rpartition(":")[2]


class DaemonLock:
    """Acquire with `acquire()`; `holder()` names the owner holding it now (or None); `release()` frees it."""

    def __init__(self, database_url: str, instance: str, *, recheck_s: float = 5.0) -> None:
        self.url, self.instance, self.recheck_s = database_url, instance, recheck_s
        self.owner: str | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._engine: Any = None
        self._file: Any = None
        self._sqlite_path = self._sqlite_lock_path(database_url)

    @staticmethod
    def _sqlite_lock_path(url: str) -> Path | None:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        if not parsed.drivername.startswith("sqlite"):
            return None
        database = parsed.database or ""
        if database in ("", ":memory:"):
            return None
        return Path(database + ".lock")

    # --- acquiring -----------------------------------------------------------------------------------

    def acquire(self, owner: str) -> None:
        """Take the lock for `owner`, or raise AlreadyRunning naming the holder."""
        self.owner = owner
        if self._sqlite_path is not None:
            self._acquire_file(owner)
            return
        if not self.url.startswith("postgresql"):
            return  # an in-memory SQLite database cannot be shared
        self._connect_and_lock(owner)
        self._thread = threading.Thread(target=self._watch, name="daemon-lock", daemon=True)
        self._thread.start()

    def _refusal(self, holder: str | None) -> AlreadyRunning:
        version = self.holder_version() if holder else None
        who = f" (held by {holder}" + (f", version {version}" if version else "") + ")" if holder else ""
        scope = "" if self._sqlite_path is not None else f" for instance {self.instance!r}"
        return AlreadyRunning(
            f"another autoresearch daemon already runs{scope} on this database{who}",
            hint="stop it first (`systemctl stop autoresearch`), or see it with `autoresearch status`; "
                 "`once` and `try` cannot run beside the daemon")

    def _acquire_file(self, owner: str) -> None:
        assert self._sqlite_path is not None
        self._sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self._sqlite_path, "a+")  # noqa: SIM115 - kept open while the lock is held
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip().partition(" ")[0] or None
            handle.close()
            raise self._refusal(holder) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{owner} {__version__}\n")
        handle.flush()
        self._file = handle

    def _connect_and_lock(self, owner: str) -> None:
        import sqlalchemy

        if self._engine is None:
            self._engine = sqlalchemy.create_engine(
                self.url, poolclass=sqlalchemy.pool.NullPool,
                connect_args={"application_name": f"{APP_PREFIX}{owner_token(owner)} {__version__}"[:63]})
        conn = self._engine.connect()
        try:
            got = conn.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": lock_key(self.instance)})
            acquired = bool(got.scalar_one())
            conn.commit()
        except BaseException:
            conn.close()
            raise
        if not acquired:
            conn.close()
            raise self._refusal(self.holder())
        self._conn = conn

    # --- watching (Postgres) --------------------------------------------------------------------------

    def _watch(self) -> None:
        import sqlalchemy

        while not self._stop.wait(self.recheck_s):
            try:
                self._conn.execute(sqlalchemy.text("SELECT 1"))
                self._conn.commit()
                continue
            except Exception:  # the connection died (server restart): the lock went with it
                with contextlib.suppress(Exception):
                    self._conn.close()
            try:
                assert self.owner is not None
                self._connect_and_lock(self.owner)
                log.warning("database connection lost and the daemon lock taken again", instance=self.instance)
            except AlreadyRunning as exc:
                log.error("daemon lock lost to another daemon: stopping", instance=self.instance, error=str(exc))
                self.lost.set()
                return
            except Exception as exc:  # still down: try again on the next tick
                log.warning("daemon lock not re-taken yet", error=type(exc).__name__)

    # --- reading -----------------------------------------------------------------------------------------

    def holder(self) -> str | None:
        """The owner holding the lock now (`owner` itself when this object holds it), None when nobody does."""
        return self._holder_info()[0]

    def holder_version(self) -> str | None:
        """The program version of the lock's holder (None when nobody holds it or it did not say)."""
        return self._holder_info()[1]

    def _holder_info(self) -> tuple[str | None, str | None]:
        if self._sqlite_path is not None:
            owner, _, version = (self._file_holder() or "").partition(" ")
            return owner or None, version or None
        if not self.url.startswith("postgresql"):
            return self.owner, __version__ if self.owner else None
        import sqlalchemy

        key = lock_key(self.instance)
        engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                name = conn.execute(sqlalchemy.text(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database()) "
                    "AND l.classid = :hi AND l.objid = :lo AND l.objsubid = 1"),
                    {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF}).scalar()
        finally:
            engine.dispose()
        if name is None:
            return None, None
        token, _, version = str(name).removeprefix(APP_PREFIX).partition(" ")
        return f"{self.instance}:{token}", version or None

    def _file_holder(self) -> str | None:
        """The lock file's line: `<owner> <version>` (an older daemon wrote the owner alone)."""
        assert self._sqlite_path is not None
        if self._file is not None:
            return f"{self.owner} {__version__}"
        if not self._sqlite_path.exists():
            return None
        with open(self._sqlite_path) as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return handle.read().strip() or None
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return None

    def owner_alive(self, owner: str) -> bool:
        """Whether `owner` (a lease owner or a run's owner label) is the daemon holding this lock now."""
        if owner == self.owner and (self._conn is not None or self._file is not None):
            return True
        holder = self.holder()
        return holder is not None and owner_token(holder) == owner_token(owner)

    # --- releasing ---------------------------------------------------------------------------------------

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._thread = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()  # closing the session frees its advisory locks
            self._conn = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

