"""Sessions: one per research window (a night, a weekend), opened by the daemon and closed with a final status.

`session_by_id` is also how the other query modules check that a session exists before they refer to it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import fields as dataclass_fields
from typing import Any, Protocol, TypeVar

from sqlalchemy import Select, insert, select, update
from sqlalchemy.engine import Connection

from daemon.errors import StoreError, TransitionError
from daemon.store.models import SessionRow
from daemon.store.records import SESSION_OPEN, SessionRecord
from daemon.store.values import sha256, utcnow

T = TypeVar("T")
SESSION_COLUMNS = [getattr(SessionRow, f.name) for f in dataclass_fields(SessionRecord)]


class _Plumbing(Protocol):
    def _read(self, what: str, work: Callable[[Connection], T]) -> T: ...

    def _write(self, what: str, work: Callable[[Connection, bool], T]) -> T: ...


def one_session(conn: Connection, query: Select[Any]) -> SessionRecord | None:
    row = conn.execute(query).first()
    return None if row is None else SessionRecord(**row._asdict())


def session_by_id(conn: Connection, session_id: int) -> SessionRecord:
    """The session, or `StoreError` when there is none with that id."""
    record = one_session(conn, select(*SESSION_COLUMNS).where(SessionRow.id == session_id))
    if record is None:
        raise StoreError(f"session {session_id} does not exist", hint="list sessions with `autoresearch status`")
    return record


class SessionQueries:
    """The sessions' part of `daemon.store.sql.Store` (a mixin over its transactions)."""

    def create_session(self: _Plumbing, tag: str, trigger: str, program_md: str,
                       config: dict[str, Any]) -> SessionRecord:
        try:
            json.dumps(config)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"session config is not JSON-serializable: {exc}",
                             hint="pass settings.model_dump(mode='json')") from None
        request_id = str(uuid.uuid4())

        def work(conn: Connection, retried: bool) -> SessionRecord:
            by_request = select(*SESSION_COLUMNS).where(SessionRow.request_id == request_id)
            if retried and (existing := one_session(conn, by_request)) is not None:
                return existing
            conn.execute(insert(SessionRow).values(
                request_id=request_id, tag=tag, trigger=trigger, program_md=program_md,
                program_sha256=sha256(program_md), config=config, status=SESSION_OPEN, started_at=utcnow(),
            ))
            created = one_session(conn, by_request)
            assert created is not None
            return created

        return self._write("create_session", work)

    def end_session(self: _Plumbing, session_id: int, status: str) -> SessionRecord:
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
            return session_by_id(conn, session_id)

        return self._write("end_session", work)

    def get_session(self: _Plumbing, session_id: int) -> SessionRecord | None:
        return self._read("get_session", lambda conn: one_session(
            conn, select(*SESSION_COLUMNS).where(SessionRow.id == session_id)))

    def latest_session(self: _Plumbing) -> SessionRecord | None:
        return self._read("latest_session", lambda conn: one_session(
            conn, select(*SESSION_COLUMNS).order_by(SessionRow.id.desc()).limit(1)))

    def list_sessions(self: _Plumbing, limit: int = 20) -> list[SessionRecord]:
        """Newest first."""
        query = select(*SESSION_COLUMNS).order_by(SessionRow.id.desc()).limit(limit)
        return self._read("list_sessions",
                          lambda conn: [SessionRecord(**row._asdict()) for row in conn.execute(query)])
