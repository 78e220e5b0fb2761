"""Experiments: the queue of runs, their claims with leases, and their state machine.

An experiment is created `queued`; `claim_next` takes the oldest queued one of a session (`FOR UPDATE SKIP
LOCKED` on Postgres, so several daemons can share one queue) and leases it to its owner, who renews the lease
while it works; `transition` moves it on with a conditional update (`WHERE id = ... AND status IN (...)`),
so zero rows touched means it was not in the expected state (`TransitionError`, nothing changed). Leases
that expire are re-queued (`requeue_expired`); a dead daemon's work is marked `interrupted`
(`interrupt_orphans`). The allowed transitions are `daemon.store.records.TRANSITIONS`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import fields as dataclass_fields
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from sqlalchemy import Select, insert, select, update
from sqlalchemy.engine import Connection

from daemon.errors import StoreError, TransitionError
from daemon.store.models import ExperimentRow
from daemon.store.records import (
    ACTIVE_STATUSES,
    KINDS,
    STATUSES,
    TERMINAL_STATUSES,
    TRANSITIONS,
    ExperimentRecord,
)
from daemon.store.sessions import session_by_id
from daemon.store.values import require_aware, require_positive, sha256, utcnow
from sandbox.sanitize import clean_fields, clean_text

T = TypeVar("T")
EXPERIMENT_COLUMNS = [getattr(ExperimentRow, f.name) for f in dataclass_fields(ExperimentRecord)]

# Fields a transition may set besides the status (results of the run and what the judge decided).
RESULT_FIELDS = frozenset({
    "commit", "val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_m",
    "num_steps", "num_params_m", "depth", "eval_seconds", "probe", "exit_code", "oom", "log_tail", "error",
    "verdict",
})


class _Plumbing(Protocol):
    def _read(self, what: str, work: Callable[[Connection], T]) -> T: ...

    def _write(self, what: str, work: Callable[[Connection, bool], T]) -> T: ...


def select_experiments() -> Select[Any]:
    """A query for whole experiment records (add `where`, `order_by`, `limit`)."""
    return select(*EXPERIMENT_COLUMNS)


def one_experiment(conn: Connection, query: Select[Any]) -> ExperimentRecord | None:
    row = conn.execute(query).first()
    return None if row is None else ExperimentRecord(**row._asdict())


def all_experiments(conn: Connection, query: Select[Any]) -> list[ExperimentRecord]:
    return [ExperimentRecord(**row._asdict()) for row in conn.execute(query)]


def experiment_by_id(conn: Connection, experiment_id: int) -> ExperimentRecord:
    """The experiment, or `StoreError` when there is none with that id."""
    record = one_experiment(conn, select_experiments().where(ExperimentRow.id == experiment_id))
    if record is None:
        raise StoreError(f"experiment {experiment_id} does not exist",
                         hint="list experiments with `autoresearch experiments`")
    return record


def _changed_by(conn: Connection, experiment_id: int, change_id: str) -> bool:
    stamp = conn.scalar(select(ExperimentRow.change_id).where(ExperimentRow.id == experiment_id))
    return bool(stamp == change_id)


class ExperimentQueries:
    """The experiments' part of `daemon.store.sql.Store` (a mixin over its transactions)."""

    def create_experiment(
        self: _Plumbing,
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
            by_request = select_experiments().where(ExperimentRow.request_id == request_id)
            if retried and (existing := one_experiment(conn, by_request)) is not None:
                return existing
            session_by_id(conn, session_id)
            for parent in (parent_id, parent2_id):
                if parent is not None:
                    experiment_by_id(conn, parent)
            conn.execute(insert(ExperimentRow).values(
                request_id=request_id, session_id=session_id, parent_id=parent_id, parent2_id=parent2_id,
                kind=kind, attempt=attempt,
                seed=seed, status="queued", description=description, hypothesis=hypothesis, diff=diff,
                source=source, source_sha256=sha256(source), source_hash=source_hash, commit="", probe="",
                oom=False, log_tail="", error="", created_at=utcnow(),
            ))
            created = one_experiment(conn, by_request)
            assert created is not None
            return created

        return self._write("create_experiment", work)

    def claim_next(
        self: _Plumbing, session_id: int, owner: str, lane: str, gpu_uuid: str | None, lease_seconds: float,
    ) -> ExperimentRecord | None:
        """Take the oldest queued experiment of the session: running, leased to `owner`. None when none is queued."""
        if not owner:
            raise StoreError("claim_next needs a non-empty lease owner")
        require_positive(lease_seconds, "lease_seconds")
        change_id = str(uuid.uuid4())

        def work(conn: Connection, retried: bool) -> ExperimentRecord | None:
            by_change = select_experiments().where(ExperimentRow.change_id == change_id)
            if retried and (earlier := one_experiment(conn, by_change)) is not None:
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
                    return experiment_by_id(conn, candidate)

        return self._write("claim_next", work)

    def renew_lease(self: _Plumbing, experiment_id: int, owner: str, lease_seconds: float) -> datetime:
        """Extend the lease of a running/evaluating experiment held by `owner`; returns the new expiry."""
        require_positive(lease_seconds, "lease_seconds")

        def work(conn: Connection, _retried: bool) -> datetime:
            expires = utcnow() + timedelta(seconds=lease_seconds)
            result = conn.execute(
                update(ExperimentRow)
                .where(ExperimentRow.id == experiment_id, ExperimentRow.lease_owner == owner,
                       ExperimentRow.status.in_(ACTIVE_STATUSES))
                .values(lease_expires_at=expires)
            )
            if result.rowcount == 0:
                current = experiment_by_id(conn, experiment_id)
                raise TransitionError(
                    f"experiment {experiment_id} is {current.status!r} leased to {current.lease_owner!r}, "
                    f"expected running/evaluating leased to {owner!r}: lease not renewed",
                    hint="the lease expired and the experiment was re-queued or taken over; stop working on it",
                )
            return expires

        return self._write("renew_lease", work)

    def transition(
        self: _Plumbing,
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
            current = experiment_by_id(conn, experiment_id)
            if result.rowcount == 0 and not (retried and current.status == new and _changed_by(
                    conn, experiment_id, change_id)):
                expectation = "/".join(expected_statuses) + (f" leased to {owner!r}" if owner is not None else "")
                raise TransitionError(
                    f"experiment {experiment_id} is {current.status!r} (lease {current.lease_owner!r}), "
                    f"expected {expectation}: nothing changed",
                    hint="another worker or a lease expiry moved it; reload it before acting",
                )
            return current

        return self._write(f"transition to {new}", work)

    def requeue_expired(self: _Plumbing, now: datetime | None = None) -> list[int]:
        """Put running/evaluating experiments whose lease expired back in the queue (attempt + 1)."""
        moment = utcnow() if now is None else require_aware(now, "now")
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

    def interrupt_orphans(self: _Plumbing, owner: str, reason: str) -> list[int]:
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

    def get_experiment(self: _Plumbing, experiment_id: int) -> ExperimentRecord | None:
        return self._read("get_experiment", lambda conn: one_experiment(
            conn, select_experiments().where(ExperimentRow.id == experiment_id)))

    def list_experiments(
        self: _Plumbing,
        session_id: int | None = None,
        status: str | Sequence[str] | None = None,
        limit: int = 50,
        *,
        kind: str | None = None,
    ) -> list[ExperimentRecord]:
        """Newest first, optionally filtered by session, status (one or several) and kind."""
        query = select_experiments().order_by(ExperimentRow.id.desc()).limit(limit)
        if session_id is not None:
            query = query.where(ExperimentRow.session_id == session_id)
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            query = query.where(ExperimentRow.status.in_(statuses))
        if kind is not None:
            query = query.where(ExperimentRow.kind == kind)
        return self._read("list_experiments", lambda conn: all_experiments(conn, query))


    def record_sandbox_job(self: _Plumbing, experiment_id: int, stage: str, handle: str) -> None:
        """Append `<stage>:<handle>` to `experiments.sandbox_jobs` (idempotent: a retried write adds it once)."""
        entry = f"{stage}:{handle}"

        def work(conn: Connection, _retried: bool) -> None:
            current = conn.scalar(select(ExperimentRow.sandbox_jobs).where(ExperimentRow.id == experiment_id))
            entries = (current or "").split()
            if entry in entries:
                return
            conn.execute(update(ExperimentRow).where(ExperimentRow.id == experiment_id)
                         .values(sandbox_jobs=" ".join([*entries, entry])))

        self._write(f"record sandbox job of experiment {experiment_id}", work)
