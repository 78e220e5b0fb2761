"""Creating the SQLAlchemy engine: Postgres through psycopg 3, SQLite set up for a daemon (WAL, FKs, locking).

SQLite transactions are taken over from the Python driver (which starts them lazily, only before
writes) so that each store transaction is explicit: readers `BEGIN`, writers `BEGIN IMMEDIATE`,
which takes the write lock at the start and makes read-then-write transactions (claims) single-writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import ConnectionPoolEntry

from daemon.errors import StoreError

SQLITE_BUSY_TIMEOUT_MS = 10_000
WRITE_OPTION = "autoresearch_write"


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain `postgresql://` URLs (SQLAlchemy would pick the absent psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves, see the module docstring
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA synchronous = NORMAL")  # safe with WAL: a power cut may lose only the last commits
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        write = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def create_store_engine(url: str, pool_size: int = 5) -> Engine:
    """An engine for `url` with pre-ping; raises `StoreError` for a malformed URL or a missing SQLite folder."""
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"database.url {url!r} is not a database URL ({exc})",
                         hint="use postgresql+psycopg://user@host/db or sqlite:///path/to/file.db") from None
    options: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            folder = Path(database).expanduser().resolve().parent
            if not folder.is_dir():
                raise StoreError(f"the SQLite database's folder {str(folder)!r} does not exist",
                                 hint="run `autoresearch init` or fix database.url / workspace")
    else:
        options.update(pool_size=pool_size, max_overflow=pool_size)
        if parsed.get_backend_name() == "postgresql":
            options["connect_args"] = {"connect_timeout": 10}
    try:
        engine = create_engine(parsed, **options)
    except (ArgumentError, ImportError) as exc:
        raise StoreError(f"cannot use database.url {parsed.render_as_string(hide_password=True)!r}: {exc}",
                         hint="use postgresql+psycopg://... or sqlite:///...") from None
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine
