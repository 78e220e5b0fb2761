"""A backup of the database before its schema changes: a consistent copy of a SQLite file (its online
backup API, safe while others read), or `pg_dump --format=custom` of a Postgres database (restore with
`pg_restore --clean --dbname URL FILE`). Files are named `<database>-<revision>-<UTC time>.<ext>`."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy.engine import make_url

from daemon.errors import StoreError

PG_DUMP_TIMEOUT_S = 3600


def pg_binary(name: str) -> str:
    """The path of a Postgres client program (pg_dump, pg_restore): on PATH, else the newest server install's."""
    found = shutil.which(name)
    if found is None:
        candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
        found = str(candidates[-1]) if candidates else None
    if found is None:
        raise StoreError(f"{name} is not installed: no backup of the Postgres database could be made",
                         hint="install the Postgres client (apt-get install postgresql-client), or pass "
                              "--no-backup after making one yourself")
    return found


def backup_database(url: str, out_dir: Path, revision: str | None) -> Path:
    """Write a backup of the database at `url` into `out_dir`; return its path. Raises `StoreError`."""
    parsed = make_url(url)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir.mkdir(parents=True, exist_ok=True)
    if parsed.drivername.startswith("sqlite"):
        source = parsed.database or ""
        if source in ("", ":memory:"):
            raise StoreError("an in-memory SQLite database cannot be backed up", hint="use --no-backup")
        target = out_dir / f"{Path(source).stem}-{revision or 'none'}-{stamp}.sqlite"
        try:
            with sqlite3.connect(f"file:{source}?mode=ro", uri=True) as src, sqlite3.connect(target) as dst:
                src.backup(dst)
        except sqlite3.Error as exc:
            raise StoreError(f"backup of {source} failed: {exc}", hint="check the file and the disk") from None
        return target
    if not parsed.drivername.startswith("postgresql"):
        raise StoreError(f"no backup method for {parsed.drivername} databases", hint="use --no-backup")
    target = out_dir / f"{parsed.database or 'postgres'}-{revision or 'none'}-{stamp}.dump"
    # The password goes through the environment, never the command line (other users can read argv).
    plain = parsed.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    env = {**os.environ, **({"PGPASSWORD": str(parsed.password)} if parsed.password else {})}
    try:
        done = subprocess.run([pg_binary("pg_dump"), "--format=custom", "--file", str(target), "--dbname", plain],
                              capture_output=True, text=True, timeout=PG_DUMP_TIMEOUT_S, check=False, env=env)
    except subprocess.TimeoutExpired:
        raise StoreError(f"pg_dump took over {PG_DUMP_TIMEOUT_S} s", hint="back up by hand, then --no-backup") from None
    if done.returncode != 0:
        target.unlink(missing_ok=True)
        reason = " ".join(done.stderr.split())[:2000]
        raise StoreError(f"pg_dump failed: {reason}", hint="fix the cause, or back up by hand and pass --no-backup")
    return target


def backup_if_behind(url: str, out_dir: Path) -> Path | None:
    """Before a migration: a backup when the database has a schema that is not the code's head (None when there
    is nothing to migrate, or no schema yet)."""
    from daemon.store.migrate import schema_state

    current, head = schema_state(url)
    if current is None or current == head:
        return None
    return backup_database(url, out_dir, current)
