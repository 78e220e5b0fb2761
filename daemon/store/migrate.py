"""Alembic migrations, configured in code so they run from an installed wheel (no alembic.ini, no cwd lookup)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, text

from daemon.errors import SchemaTooNew, StoreError
from daemon.store.engine import normalize_url

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Arbitrary constant: serializes concurrent upgrades from several daemons sharing one Postgres.
_PG_UPGRADE_LOCK_KEY = 4_711_2026


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config pointing at the packaged migrations; `connection` is the one env.py migrates."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the packaged migrations have no head revision"
    return head


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def ensure_not_newer(connection: Connection) -> str | None:
    """Return the database's revision; raise `SchemaTooNew` if this program does not know it."""
    current = current_revision(connection)
    if current is None:
        return None
    known = {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if current not in known:
        raise SchemaTooNew(
            f"database schema {current} is newer than this program knows (head {head_revision()}): "
            "upgrade autoresearch",
            hint="install the autoresearch version that migrated this database, or point database.url elsewhere",
        )
    return current


def upgrade(connection: Connection) -> None:
    """Migrate to head inside the caller's transaction, refusing a database newer than the code."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_UPGRADE_LOCK_KEY})
    ensure_not_newer(connection)
    command.upgrade(alembic_config(connection), "head")


def known_revision(name: str) -> str:
    """The full revision id for `name` (a full id or its number prefix, e.g. "0005"); raises `StoreError`."""
    revisions = [script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()]
    matches = [rev for rev in revisions if rev == name or rev.split("_", 1)[0] == name]
    if len(matches) != 1:
        raise StoreError(f"unknown schema revision {name!r}",
                         hint=f"one of: {', '.join(sorted(revisions))}")
    return matches[0]


def downgrade(connection: Connection, revision: str) -> None:
    """Migrate down to `revision` (an ancestor of the database's own) inside the caller's transaction."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_UPGRADE_LOCK_KEY})
    target = known_revision(revision)
    current = ensure_not_newer(connection)
    if current is None:
        raise StoreError("the database has no schema: nothing to downgrade", hint="point database.url elsewhere")
    scripts = ScriptDirectory.from_config(alembic_config())
    below = {script.revision for script in scripts.iterate_revisions(current, "base")}
    if target not in below:
        raise StoreError(f"{target} is not at or below the database's revision {current}",
                         hint="`autoresearch db current` shows the revision; upgrade instead")
    command.downgrade(alembic_config(connection), target)


def schema_state(url: str) -> tuple[str | None, str]:
    """(the database's revision or None when never migrated, the code's head revision)."""
    engine = create_engine(normalize_url(url))
    try:
        with engine.connect() as connection:
            return current_revision(connection), head_revision()
    finally:
        engine.dispose()
