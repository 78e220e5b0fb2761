"""Alembic environment: migrates the connection handed over by `daemon.store.migrate` (never a URL from a file)."""

from __future__ import annotations

from alembic import context

from daemon.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `autoresearch db upgrade` (daemon.store.migrate), not the alembic CLI")

# SQLite cannot ALTER most things in place: batch mode rebuilds tables for future migrations.
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
