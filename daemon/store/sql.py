"""`Store`: the only code that reads and writes the database, on Postgres and SQLite alike.

Each public method is one transaction, retried through transient errors (`daemon.store.retry`).
Writes are idempotent under retry: creates carry a client-made `request_id` and updates stamp a
`change_id`, so an attempt that committed just before its connection dropped is found, not repeated.
State changes are conditional updates (`WHERE id = ... AND status IN (...)`): zero rows touched
means the experiment was not in the expected state, reported as `TransitionError`, nothing changed.

`Store` itself holds the engine and the transactions (`_read`, `_write`: one retried transaction each)
and runs the schema migrations; its queries come by concern from one mixin each, which runs its work
through those two methods:

- `daemon.store.sessions`: sessions (create, end, list);
- `daemon.store.experiments`: the experiment queue, claims with leases, transitions;
- `daemon.store.results`: the incumbent, the baseline, the prompt's history, the noise floor, results.tsv;
- `daemon.store.agent_calls`: LLM calls and their cost;
- `daemon.store.lines`: research lines, the notebook, smoke runs, measurement versions;
- `daemon.store.scored_runs`: the replay guard's memory;
- `daemon.store.retests`: re-tests of the night's result on fresh seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from daemon.errors import StoreError
from daemon.store import migrate
from daemon.store.agent_calls import AgentCallQueries
from daemon.store.engine import WRITE_OPTION
from daemon.store.experiments import ExperimentQueries
from daemon.store.lines import LineQueries
from daemon.store.results import ResultQueries
from daemon.store.retests import RetestQueries
from daemon.store.retry import call_with_retry
from daemon.store.scored_runs import ScoredRunQueries
from daemon.store.sessions import SessionQueries
from daemon.store.values import utcnow

__all__ = ["Store", "utcnow"]

T = TypeVar("T")


class Store(SessionQueries, ExperimentQueries, ResultQueries, AgentCallQueries, LineQueries, ScoredRunQueries,
            RetestQueries):
    """The repository API of the daemon: sessions, experiments with leases, noise, agent costs, exports."""

    def __init__(self, engine: Engine, *, retry_seconds: float = 120.0) -> None:
        self._engine = engine
        self._writer = engine.execution_options(**{WRITE_OPTION: True})
        self._retry_seconds = retry_seconds

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    # -- plumbing ---------------------------------------------------------------------------------

    def _read(self, what: str, work: Callable[[Connection], T]) -> T:
        def attempt(_retried: bool) -> T:
            with self._engine.begin() as conn:
                return work(conn)

        return self._guarded(what, attempt)

    def _write(self, what: str, work: Callable[[Connection, bool], T]) -> T:
        def attempt(retried: bool) -> T:
            with self._writer.begin() as conn:
                return work(conn, retried)

        return self._guarded(what, attempt)

    def _guarded(self, what: str, attempt: Callable[[bool], T]) -> T:
        try:
            return call_with_retry(attempt, retry_seconds=self._retry_seconds, what=what)
        except DBAPIError as exc:  # transient ones were retried, then raised as StoreError
            raise self._explain(exc, what) from exc

    @staticmethod
    def _explain(exc: DBAPIError, what: str) -> StoreError:
        message = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
        if "no such table" in message or getattr(exc.orig, "sqlstate", None) == "42P01":
            return StoreError(f"{what}: the database has no autoresearch schema ({message})",
                              hint="run `autoresearch db upgrade`")
        if isinstance(exc, IntegrityError):
            return StoreError(f"{what}: refused by the database ({message})",
                              hint="check that the referenced session/experiment exists")
        return StoreError(f"{what}: {message}")

    def ping(self) -> bool:
        """Whether the database answers now (no retry): for health checks."""
        try:
            with self._engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except DBAPIError:
            return False
        return True

    def upgrade(self) -> None:
        """Migrate the schema to head; raises `SchemaTooNew` for a database migrated by a newer program."""
        self._migrate("schema upgrade", migrate.upgrade)

    def downgrade(self, revision: str) -> None:
        """Migrate the schema down to `revision` (a rollback before installing an older program)."""
        self._migrate("schema downgrade", lambda conn: migrate.downgrade(conn, revision))

    def _migrate(self, what: str, work: Callable[[Connection], None]) -> None:
        """Run a migration in one transaction. SQLite alters a table by rebuilding it (Alembic's batch mode):
        with foreign keys on, dropping the old copy would cascade-delete every row that refers to it, so on
        SQLite the keys are off for the migration (a PRAGMA only takes effect outside a transaction) and the
        result is checked with `PRAGMA foreign_key_check` before the commit."""
        if self._engine.dialect.name != "sqlite":
            self._write(what, lambda conn, _retried: work(conn))
            return

        def attempt(_retried: bool) -> None:
            with self._writer.connect() as conn:
                raw = conn.connection.dbapi_connection
                assert raw is not None
                raw.execute("PRAGMA foreign_keys = OFF")
                try:
                    with conn.begin():
                        work(conn)
                        broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                        if broken:
                            raise StoreError(f"{what}: {len(broken)} rows would lose their references "
                                             f"(first: {tuple(broken[0])}); nothing was changed",
                                             hint="report this: a migration would break the data")
                finally:
                    raw.execute("PRAGMA foreign_keys = ON")

        self._guarded(what, attempt)

