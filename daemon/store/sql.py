"""`Store`: the only code that reads and writes the database, on Postgres and SQLite alike.

Each public method is one transaction, retried through transient errors (`daemon.store.retry`).
Writes are idempotent under retry: creates carry a client-made `request_id` and updates stamp a
`change_id`, so an attempt that committed just before its connection dropped is found, not repeated.
State changes are conditional updates (`WHERE id = ... AND status IN (...)`): zero rows touched
means the experiment was not in the expected state, reported as `TransitionError`, nothing changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields as dataclass_fields
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Select, func, insert, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from daemon.errors import StoreError, TransitionError
from daemon.store import migrate
from daemon.store.engine import WRITE_OPTION
from daemon.store.lines import LineQueries
from daemon.store.models import AgentCallRow, ExperimentRow, NoiseRow, SessionRow
from daemon.store.records import (
    ACTIVE_STATUSES,
    KINDS,
    SESSION_OPEN,
    STATUSES,
    TERMINAL_STATUSES,
    TRANSITIONS,
    AgentCallRecord,
    ExperimentRecord,
    NoiseFloor,
    SessionRecord,
)
from daemon.store.retests import RetestQueries
from daemon.store.retry import call_with_retry
from daemon.store.scored_runs import ScoredRunQueries
from sandbox.sanitize import clean_fields, clean_text

T = TypeVar("T")

# Fields a transition may set besides the status (results of the run and what the judge decided).
RESULT_FIELDS = frozenset({
    "commit", "val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_m",
    "num_steps", "num_params_m", "depth", "eval_seconds", "probe", "exit_code", "oom", "log_tail", "error",
    "verdict",
})
_EXPERIMENT_COLUMNS = [getattr(ExperimentRow, f.name) for f in dataclass_fields(ExperimentRecord)]
_SESSION_COLUMNS = [getattr(SessionRow, f.name) for f in dataclass_fields(SessionRecord)]
_AGENT_CALL_COLUMNS = [getattr(AgentCallRow, f.name) for f in dataclass_fields(AgentCallRecord)]

# results.tsv speaks the original experiment's words.
_TSV_STATUS = {"kept": "keep", "discarded": "discard", "crashed": "crash", "timeout": "crash", "oom": "crash",
               "invalid": "crash"}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _require_aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None:
        raise StoreError(f"{name} {value.isoformat()} has no time zone",
                         hint="pass a timezone-aware datetime, e.g. datetime.now(timezone.utc)")
    return value.astimezone(timezone.utc)


def _require_positive(value: float, name: str) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise StoreError(f"{name} must be a positive number of seconds, got {value!r}")


def _sha256(text_value: str) -> str:
    return hashlib.sha256(text_value.encode("utf-8")).hexdigest()


def _one_line(value: str) -> str:
    return " ".join(value.replace("\t", " ").splitlines()).strip()


class Store(LineQueries, ScoredRunQueries, RetestQueries):
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

    # -- row conversion -----------------------------------------------------------------------

    @staticmethod
    def _experiment(conn: Connection, query: Select[Any]) -> ExperimentRecord | None:
        row = conn.execute(query).first()
        return None if row is None else ExperimentRecord(**row._asdict())

    @staticmethod
    def _experiments(conn: Connection, query: Select[Any]) -> list[ExperimentRecord]:
        return [ExperimentRecord(**row._asdict()) for row in conn.execute(query)]

    @staticmethod
    def _select_experiments() -> Select[Any]:
        return select(*_EXPERIMENT_COLUMNS)

    def _experiment_by_id(self, conn: Connection, experiment_id: int) -> ExperimentRecord:
        record = self._experiment(conn, self._select_experiments().where(ExperimentRow.id == experiment_id))
        if record is None:
            raise StoreError(f"experiment {experiment_id} does not exist",
                             hint="list experiments with `autoresearch experiments`")
        return record

    @staticmethod
    def _session(conn: Connection, query: Select[Any]) -> SessionRecord | None:
        row = conn.execute(query).first()
        return None if row is None else SessionRecord(**row._asdict())

    def _session_by_id(self, conn: Connection, session_id: int) -> SessionRecord:
        record = self._session(conn, select(*_SESSION_COLUMNS).where(SessionRow.id == session_id))
        if record is None:
            raise StoreError(f"session {session_id} does not exist", hint="list sessions with `autoresearch status`")
        return record

    # -- sessions ---------------------------------------------------------------------------------

    def create_session(self, tag: str, trigger: str, program_md: str, config: dict[str, Any]) -> SessionRecord:
        try:
            json.dumps(config)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"session config is not JSON-serializable: {exc}",
                             hint="pass settings.model_dump(mode='json')") from None
        request_id = str(uuid.uuid4())

        def work(conn: Connection, retried: bool) -> SessionRecord:
            by_request = select(*_SESSION_COLUMNS).where(SessionRow.request_id == request_id)
            if retried and (existing := self._session(conn, by_request)) is not None:
                return existing
            conn.execute(insert(SessionRow).values(
                request_id=request_id, tag=tag, trigger=trigger, program_md=program_md,
                program_sha256=_sha256(program_md), config=config, status=SESSION_OPEN, started_at=utcnow(),
            ))
            created = self._session(conn, by_request)
            assert created is not None
            return created

        return self._write("create_session", work)

    def end_session(self, session_id: int, status: str) -> SessionRecord:
        """Close an open session with a final status (e.g. `finished`, `stopped`, `failed`)."""
        if not status or status == SESSION_OPEN or len(status) > 20:
            raise StoreError(f"session end status {status!r} is invalid",
                             hint=f"use a short word other than {SESSION_OPEN!r}, e.g. 'finished'")
        change_id = str(uuid.uuid4())

        def work(conn: Connection, retried: bool) -> SessionRecord:
            result = conn.execute(
                update(SessionRow)
                .where(SessionRow.id == session_id, SessionRow.status == SESSION_OPEN)
                .values(status=status, ended_at=utcnow(), change_id=change_id)
            )
            if result.rowcount == 0:
                row = conn.execute(select(SessionRow.status, SessionRow.change_id)
                                   .where(SessionRow.id == session_id)).first()
                if row is None:
                    raise StoreError(f"session {session_id} does not exist")
                if not (retried and row.change_id == change_id):
                    raise TransitionError(f"session {session_id} is {row.status!r}, expected {SESSION_OPEN!r}: "
                                          "nothing changed")
            return self._session_by_id(conn, session_id)

        return self._write("end_session", work)

    def get_session(self, session_id: int) -> SessionRecord | None:
        return self._read("get_session", lambda conn: self._session(
            conn, select(*_SESSION_COLUMNS).where(SessionRow.id == session_id)))

    def latest_session(self) -> SessionRecord | None:
        return self._read("latest_session", lambda conn: self._session(
            conn, select(*_SESSION_COLUMNS).order_by(SessionRow.id.desc()).limit(1)))

    def list_sessions(self, limit: int = 20) -> list[SessionRecord]:
        """Newest first."""
        query = select(*_SESSION_COLUMNS).order_by(SessionRow.id.desc()).limit(limit)
        return self._read("list_sessions",
                          lambda conn: [SessionRecord(**row._asdict()) for row in conn.execute(query)])

    # -- experiments ------------------------------------------------------------------------------

    def create_experiment(
        self,
        session_id: int,
        kind: str,
        source: str,
        *,
        parent_id: int | None = None,
        description: str = "",
        hypothesis: str = "",
        diff: str = "",
        seed: int = 0,
        attempt: int = 1,
        source_hash: str = "",
        parent2_id: int | None = None,
    ) -> ExperimentRecord:
        """Queue an experiment. `source_hash` is the caller's normalized-source hash (for dedup);
        `parent2_id` is the earlier change a combine move merged onto `parent_id`."""
        if kind not in KINDS:
            raise StoreError(f"unknown experiment kind {kind!r}", hint=f"use one of {', '.join(KINDS)}")
        if attempt < 1:
            raise StoreError(f"attempt must be >= 1, got {attempt}")
        if not isinstance(source, str) or not source.strip():
            raise StoreError("experiment source is empty", hint="pass the full text of the candidate train.py")
        request_id = str(uuid.uuid4())
        description, hypothesis, diff = (clean_text(text) for text in (description, hypothesis, diff))

        def work(conn: Connection, retried: bool) -> ExperimentRecord:
            by_request = self._select_experiments().where(ExperimentRow.request_id == request_id)
            if retried and (existing := self._experiment(conn, by_request)) is not None:
                return existing
            self._session_by_id(conn, session_id)
            for parent in (parent_id, parent2_id):
                if parent is not None:
                    self._experiment_by_id(conn, parent)
            conn.execute(insert(ExperimentRow).values(
                request_id=request_id, session_id=session_id, parent_id=parent_id, parent2_id=parent2_id,
                kind=kind, attempt=attempt,
                seed=seed, status="queued", description=description, hypothesis=hypothesis, diff=diff,
                source=source, source_sha256=_sha256(source), source_hash=source_hash, commit="", probe="",
                oom=False, log_tail="", error="", created_at=utcnow(),
            ))
            created = self._experiment(conn, by_request)
            assert created is not None
            return created

        return self._write("create_experiment", work)

    def claim_next(
        self, session_id: int, owner: str, lane: str, gpu_uuid: str | None, lease_seconds: float,
    ) -> ExperimentRecord | None:
        """Take the oldest queued experiment of the session: running, leased to `owner`. None when none is queued."""
        if not owner:
            raise StoreError("claim_next needs a non-empty lease owner")
        _require_positive(lease_seconds, "lease_seconds")
        change_id = str(uuid.uuid4())

        def work(conn: Connection, retried: bool) -> ExperimentRecord | None:
            by_change = self._select_experiments().where(ExperimentRow.change_id == change_id)
            if retried and (earlier := self._experiment(conn, by_change)) is not None:
                return earlier
            while True:
                # FOR UPDATE SKIP LOCKED on Postgres; SQLite ignores it and is serialized by BEGIN IMMEDIATE.
                candidate = conn.scalar(
                    select(ExperimentRow.id)
                    .where(ExperimentRow.session_id == session_id, ExperimentRow.status == "queued")
                    .order_by(ExperimentRow.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
                if candidate is None:
                    return None
                now = utcnow()
                claimed = conn.execute(
                    update(ExperimentRow)
                    .where(ExperimentRow.id == candidate, ExperimentRow.status == "queued")
                    .values(status="running", lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_seconds),
                            started_at=now, lane=lane, gpu_uuid=gpu_uuid, change_id=change_id)
                )
                if claimed.rowcount == 1:
                    return self._experiment_by_id(conn, candidate)

        return self._write("claim_next", work)

    def renew_lease(self, experiment_id: int, owner: str, lease_seconds: float) -> datetime:
        """Extend the lease of a running/evaluating experiment held by `owner`; returns the new expiry."""
        _require_positive(lease_seconds, "lease_seconds")

        def work(conn: Connection, _retried: bool) -> datetime:
            expires = utcnow() + timedelta(seconds=lease_seconds)
            result = conn.execute(
                update(ExperimentRow)
                .where(ExperimentRow.id == experiment_id, ExperimentRow.lease_owner == owner,
                       ExperimentRow.status.in_(ACTIVE_STATUSES))
                .values(lease_expires_at=expires)
            )
            if result.rowcount == 0:
                current = self._experiment_by_id(conn, experiment_id)
                raise TransitionError(
                    f"experiment {experiment_id} is {current.status!r} leased to {current.lease_owner!r}, "
                    f"expected running/evaluating leased to {owner!r}: lease not renewed",
                    hint="the lease expired and the experiment was re-queued or taken over; stop working on it",
                )
            return expires

        return self._write("renew_lease", work)

    def transition(
        self,
        experiment_id: int,
        expected: str | tuple[str, ...],
        new: str,
        *,
        owner: str | None = None,
        **fields: Any,
    ) -> ExperimentRecord:
        """Move an experiment from one of `expected` to `new`, setting result `fields`, in one transaction.

        With `owner`, the experiment must also still be leased to it (a lane that lost its lease
        cannot overwrite the run of the lane that took it over).
        """
        expected_statuses = (expected,) if isinstance(expected, str) else tuple(expected)
        unknown = [s for s in (*expected_statuses, new) if s not in STATUSES]
        if unknown or not expected_statuses:
            raise StoreError(f"unknown experiment status {unknown or expected!r}",
                             hint=f"statuses are {', '.join(STATUSES)}")
        illegal = [s for s in expected_statuses if new not in TRANSITIONS.get(s, frozenset())]
        if illegal:
            raise TransitionError(f"experiment {experiment_id}: {illegal[0]!r} -> {new!r} is not an allowed "
                                  "transition: nothing changed", hint="see the transitions in docs/contracts.md")
        bad_fields = sorted(set(fields) - RESULT_FIELDS)
        if bad_fields:
            raise StoreError(f"transition cannot set {', '.join(bad_fields)}",
                             hint=f"settable fields: {', '.join(sorted(RESULT_FIELDS))}")
        change_id = str(uuid.uuid4())
        fields = clean_fields(fields)  # no NUL, surrogate, escape or out-of-range number reaches the database

        def work(conn: Connection, retried: bool) -> ExperimentRecord:
            values: dict[str, Any] = {**fields, "status": new, "change_id": change_id}
            if new in TERMINAL_STATUSES:
                values["finished_at"] = utcnow()
            conditions = [ExperimentRow.id == experiment_id, ExperimentRow.status.in_(expected_statuses)]
            if owner is not None:
                conditions.append(ExperimentRow.lease_owner == owner)
            result = conn.execute(update(ExperimentRow).where(*conditions).values(**values))
            current = self._experiment_by_id(conn, experiment_id)
            if result.rowcount == 0 and not (retried and current.status == new and self._changed_by(
                    conn, experiment_id, change_id)):
                expectation = "/".join(expected_statuses) + (f" leased to {owner!r}" if owner is not None else "")
                raise TransitionError(
                    f"experiment {experiment_id} is {current.status!r} (lease {current.lease_owner!r}), "
                    f"expected {expectation}: nothing changed",
                    hint="another worker or a lease expiry moved it; reload it before acting",
                )
            return current

        return self._write(f"transition to {new}", work)

    @staticmethod
    def _changed_by(conn: Connection, experiment_id: int, change_id: str) -> bool:
        stamp = conn.scalar(select(ExperimentRow.change_id).where(ExperimentRow.id == experiment_id))
        return bool(stamp == change_id)

    def requeue_expired(self, now: datetime | None = None) -> list[int]:
        """Put running/evaluating experiments whose lease expired back in the queue (attempt + 1)."""
        moment = utcnow() if now is None else _require_aware(now, "now")
        change_id = str(uuid.uuid4())

        def work(conn: Connection, _retried: bool) -> list[int]:
            conn.execute(
                update(ExperimentRow)
                .where(ExperimentRow.status.in_(ACTIVE_STATUSES), ExperimentRow.lease_expires_at < moment)
                .values(status="queued", attempt=ExperimentRow.attempt + 1, lease_owner=None,
                        lease_expires_at=None, started_at=None, change_id=change_id)
            )
            return list(conn.scalars(select(ExperimentRow.id).where(ExperimentRow.change_id == change_id)
                                     .order_by(ExperimentRow.id)))

        return self._write("requeue_expired", work)

    def interrupt_orphans(self, owner: str, reason: str) -> list[int]:
        """Mark running/evaluating experiments leased to exactly `owner` (a dead daemon process) interrupted."""
        if not owner:
            raise StoreError("interrupt_orphans needs an owner",
                             hint="pass the dead daemon process's owner id so other daemons' work is left alone")
        change_id = str(uuid.uuid4())

        def work(conn: Connection, _retried: bool) -> list[int]:
            conn.execute(
                update(ExperimentRow)
                .where(ExperimentRow.status.in_(ACTIVE_STATUSES), ExperimentRow.lease_owner == owner)
                .values(status="interrupted", error=reason, finished_at=utcnow(), change_id=change_id)
            )
            return list(conn.scalars(select(ExperimentRow.id).where(ExperimentRow.change_id == change_id)
                                     .order_by(ExperimentRow.id)))

        return self._write("interrupt_orphans", work)

    def get_experiment(self, experiment_id: int) -> ExperimentRecord | None:
        return self._read("get_experiment", lambda conn: self._experiment(
            conn, self._select_experiments().where(ExperimentRow.id == experiment_id)))

    def list_experiments(
        self,
        session_id: int | None = None,
        status: str | Sequence[str] | None = None,
        limit: int = 50,
        *,
        kind: str | None = None,
    ) -> list[ExperimentRecord]:
        """Newest first, optionally filtered by session, status (one or several) and kind."""
        query = self._select_experiments().order_by(ExperimentRow.id.desc()).limit(limit)
        if session_id is not None:
            query = query.where(ExperimentRow.session_id == session_id)
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            query = query.where(ExperimentRow.status.in_(statuses))
        if kind is not None:
            query = query.where(ExperimentRow.kind == kind)
        return self._read("list_experiments", lambda conn: self._experiments(conn, query))

    # -- judging and prompting --------------------------------------------------------------------

    def best(self, session_id: int) -> ExperimentRecord | None:
        """The incumbent: the experiment kept last (each keep beat the one before it, by the judge's rule).

        Not the lowest val_bpb: a single run's value is a noisy draw (the judge compares means), and a
        simpler change may be kept at an equal result.
        """
        query = (self._select_experiments()
                 .where(ExperimentRow.session_id == session_id, ExperimentRow.status == "kept",
                        ExperimentRow.val_bpb.is_not(None))
                 .order_by(ExperimentRow.finished_at.desc(), ExperimentRow.id.desc()).limit(1))
        return self._read("best", lambda conn: self._experiment(conn, query))

    def baseline(self, session_id: int) -> ExperimentRecord | None:
        """The session's first baseline that ended `kept`."""
        query = (self._select_experiments()
                 .where(ExperimentRow.session_id == session_id, ExperimentRow.kind == "baseline",
                        ExperimentRow.status == "kept")
                 .order_by(ExperimentRow.id).limit(1))
        return self._read("baseline", lambda conn: self._experiment(conn, query))

    def history(self, session_id: int, limit: int) -> list[ExperimentRecord]:
        """The last `limit` finished experiments of the session, oldest first (prompt order)."""
        query = (self._select_experiments()
                 .where(ExperimentRow.session_id == session_id, ExperimentRow.status.in_(TERMINAL_STATUSES))
                 .order_by(ExperimentRow.finished_at.desc(), ExperimentRow.id.desc()).limit(limit))
        return self._read("history", lambda conn: list(reversed(self._experiments(conn, query))))

    def add_noise(self, session_id: int, experiment_id: int | None, val_bpb: float, seed: int) -> None:
        """Record one val_bpb of an unchanged re-run, a sample of the noise floor."""
        if not (isinstance(val_bpb, int | float) and math.isfinite(val_bpb) and val_bpb > 0):
            raise StoreError(f"noise val_bpb must be a positive finite number, got {val_bpb!r}")
        request_id = str(uuid.uuid4())

        def work(conn: Connection, retried: bool) -> None:
            if retried and conn.scalar(select(NoiseRow.id).where(NoiseRow.request_id == request_id)) is not None:
                return
            self._session_by_id(conn, session_id)
            conn.execute(insert(NoiseRow).values(request_id=request_id, session_id=session_id,
                                                 experiment_id=experiment_id, val_bpb=float(val_bpb), seed=seed,
                                                 created_at=utcnow()))

        self._write("add_noise", work)

    def noise_floor(self, session_id: int) -> NoiseFloor:
        def work(conn: Connection) -> NoiseFloor:
            values = list(conn.scalars(select(NoiseRow.val_bpb).where(NoiseRow.session_id == session_id)))
            if not values:
                return NoiseFloor(mean=None, std=0.0, n=0)
            std = statistics.stdev(values) if len(values) >= 2 else 0.0
            return NoiseFloor(mean=statistics.fmean(values), std=std, n=len(values))

        return self._read("noise_floor", work)

    def seen_hashes(self, session_id: int) -> set[str]:
        """Normalized-source hashes of every experiment of the session (the agent's dedup set)."""
        query = (select(ExperimentRow.source_hash).distinct()
                 .where(ExperimentRow.session_id == session_id, ExperimentRow.source_hash != ""))
        return self._read("seen_hashes", lambda conn: set(conn.scalars(query)))

    # -- money ------------------------------------------------------------------------------------

    def record_agent_call(self, call: AgentCallRecord) -> AgentCallRecord:
        """Store one LLM call; returns it with `id` and `created_at` filled."""
        counts = {name: getattr(call, name) for name in
                  ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "cost_usd", "latency_s")}
        negative = [f"{name}={value!r}" for name, value in counts.items()
                    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0)]
        if negative:
            raise StoreError(f"agent call has invalid counts: {', '.join(negative)}",
                             hint="tokens, cost and latency are finite and >= 0")
        request_id = str(uuid.uuid4())
        created_at = _require_aware(call.created_at, "created_at") if call.created_at is not None else utcnow()
        values = {f.name: getattr(call, f.name) for f in dataclass_fields(AgentCallRecord) if f.name != "id"}
        values.update(created_at=created_at, request_id=request_id)
        by_request = select(*_AGENT_CALL_COLUMNS).where(AgentCallRow.request_id == request_id)

        def work(conn: Connection, retried: bool) -> AgentCallRecord:
            if not retried or (row := conn.execute(by_request).first()) is None:
                conn.execute(insert(AgentCallRow).values(**values))
                row = conn.execute(by_request).one()
            return AgentCallRecord(**row._asdict())

        return self._write("record_agent_call", work)

    def cost_since(self, since: datetime) -> float:
        """Dollars spent on agent calls made at or after `since`."""
        moment = _require_aware(since, "since")
        query = select(func.coalesce(func.sum(AgentCallRow.cost_usd), 0.0)).where(AgentCallRow.created_at >= moment)
        return self._read("cost_since", lambda conn: float(conn.scalar(query) or 0.0))

    # -- export -----------------------------------------------------------------------------------

    def results_tsv(self, session_id: int) -> str:
        """The session's finished experiments in the original results.tsv format (tab-separated, header first),
        then its re-test runs (status `retest`: upstream's analysis.ipynb counts and plots only keep/discard/crash
        rows, and takes its baseline from the first row, so rows after the night's change nothing there)."""
        query = (self._select_experiments()
                 .where(ExperimentRow.session_id == session_id, ExperimentRow.status.in_(TERMINAL_STATUSES))
                 .order_by(ExperimentRow.id))
        records = self._read("results_tsv", lambda conn: self._experiments(conn, query))
        return "".join(_tsv_line(fields) for fields in
                       [("commit", "val_bpb", "memory_gb", "status", "description"),
                        *(_tsv_fields(r) for r in records), *self.retest_tsv(session_id)])


def _tsv_fields(record: ExperimentRecord) -> tuple[str, str, str, str, str]:
    status = _TSV_STATUS.get(record.status, record.status)
    crashed = status == "crash"
    val_bpb = 0.0 if crashed or record.val_bpb is None else record.val_bpb
    memory_gb = 0.0 if crashed or record.peak_vram_mb is None else record.peak_vram_mb / 1024
    commit = (record.commit or record.source_sha256)[:7]
    return commit, f"{val_bpb:.6f}", f"{memory_gb:.1f}", status, _one_line(record.description)


def _tsv_line(fields: Iterable[str]) -> str:
    return "\t".join(fields) + "\n"
