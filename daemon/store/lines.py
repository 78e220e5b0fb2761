"""Research lines, their notebook and smoke runs: what carries the research over from one night to the next.

A research line is a chain of sessions that continue one another: each new session joins the current
line (the newest one), starts from the line's best and reads the line's ledger and notebook. A new line
(`autoresearch notebook fresh`, or `agent.continue_line = false`) starts over from the workspace's
train.py with an empty notebook. The notebook is versioned: every write (the agent's, with each
proposal, or a researcher's edit) is a new entry, and the newest entry is the notebook. Smoke runs (a
candidate's seconds-long check before its full run) are recorded per session for the ledger and the report.

Each line has a secret fence id (`line_nonce`): the nonce of the data fences in the agent's prompt
(daemon.agents.fences), made at random the first time it is asked for, never shown to a candidate.
Each experiment of the line is tagged with the measurement version it was measured under
(`tag_measurement_version`, read by the idea memory, daemon.research.ideas): what val_bpb means changes
when the eval or the training clock does.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy import Float, ForeignKey, Integer, String, Text, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapped, mapped_column

from daemon.errors import StoreError
from daemon.store.models import Base
from daemon.store.values import utcnow

T = TypeVar("T")
AUTHORS = ("agent", "researcher")
MAX_NOTEBOOK_CHARS = 20_000


class ResearchLineRow(Base):
    __tablename__ = "research_lines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(36), unique=True)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]
    prompt_nonce: Mapped[str | None] = mapped_column(String(64))


class IdeaMemoryRow(Base):
    """The measurement version an experiment was measured under (migration 0006_idea_memory)."""

    __tablename__ = "idea_memory"

    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True)
    measurement_version: Mapped[int] = mapped_column(Integer)


class SessionLineRow(Base):
    __tablename__ = "session_lines"

    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True)
    line_id: Mapped[int] = mapped_column(ForeignKey("research_lines.id", ondelete="CASCADE"), index=True)


class NotebookRow(Base):
    __tablename__ = "notebook_entries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(36), unique=True)
    line_id: Mapped[int] = mapped_column(ForeignKey("research_lines.id", ondelete="CASCADE"), index=True)
    session_id: Mapped[int | None] = mapped_column(ForeignKey("sessions.id", ondelete="SET NULL"))
    experiment_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id", ondelete="SET NULL"))
    author: Mapped[str] = mapped_column(String(50))
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]


class SmokeRunRow(Base):
    __tablename__ = "smoke_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(36), unique=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(20))  # running | passed | crashed | timeout | oom | invalid | ...
    repair_round: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(Text)
    source_hash: Mapped[str] = mapped_column(String(64))
    seconds: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str] = mapped_column(Text)
    log_tail: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]


@dataclass(frozen=True)
class SmokeRun:
    id: int
    session_id: int
    status: str
    repair_round: int
    description: str
    source_hash: str
    seconds: float | None
    error: str
    log_tail: str
    created_at: datetime


@dataclass(frozen=True)
class NotebookEntry:
    id: int
    line_id: int
    session_id: int | None
    experiment_id: int | None
    author: str
    text: str
    created_at: datetime


class _Plumbing(Protocol):
    def _read(self, what: str, work: Callable[[Connection], T]) -> T: ...

    def _write(self, what: str, work: Callable[[Connection, bool], T]) -> T: ...


def _entry(row: Any) -> NotebookEntry:
    return NotebookEntry(row.id, row.line_id, row.session_id, row.experiment_id, row.author, row.text, row.created_at)


class LineQueries:
    """The research-line and notebook part of `daemon.store.sql.Store` (a mixin over its transactions)."""

    def new_line(self: _Plumbing, reason: str) -> int:
        """Start a new research line; the next session joins it. Returns its id."""
        request_id = str(uuid.uuid4())

        def work(conn: Connection, retried: bool) -> int:
            if retried and (found := conn.scalar(select(ResearchLineRow.id).where(
                    ResearchLineRow.request_id == request_id))) is not None:
                return int(found)
            conn.execute(insert(ResearchLineRow).values(request_id=request_id, reason=reason[:2000],
                                                        created_at=utcnow()))
            return int(conn.execute(select(ResearchLineRow.id).where(ResearchLineRow.request_id == request_id)).scalar_one())

        return self._write("new research line", work)

    def current_line(self: _Plumbing) -> int | None:
        """The newest research line, or None before the first."""
        return self._read("current research line", lambda conn: conn.scalar(
            select(ResearchLineRow.id).order_by(ResearchLineRow.id.desc()).limit(1)))

    def join_line(self: _Plumbing, session_id: int, line_id: int) -> int:
        """Put a session on a line (once: a session already on a line stays there). Returns its line."""

        def work(conn: Connection, _retried: bool) -> int:
            existing = conn.scalar(select(SessionLineRow.line_id).where(SessionLineRow.session_id == session_id))
            if existing is not None:
                return int(existing)
            if conn.scalar(select(ResearchLineRow.id).where(ResearchLineRow.id == line_id)) is None:
                raise StoreError(f"research line {line_id} does not exist")
            conn.execute(insert(SessionLineRow).values(session_id=session_id, line_id=line_id))
            return line_id

        return self._write("join research line", work)

    def line_of(self: _Plumbing, session_id: int) -> int | None:
        return self._read("line of session", lambda conn: conn.scalar(
            select(SessionLineRow.line_id).where(SessionLineRow.session_id == session_id)))

    def line_sessions(self: _Plumbing, line_id: int) -> list[int]:
        """The line's sessions, oldest first."""
        return self._read("sessions of line", lambda conn: [int(value) for value in conn.scalars(
            select(SessionLineRow.session_id).where(SessionLineRow.line_id == line_id)
            .order_by(SessionLineRow.session_id))])

    def line_nonce(self: _Plumbing, line_id: int) -> str:
        """The line's secret fence id: made once (random), the same for every later proposal and night."""

        def work(conn: Connection, _retried: bool) -> str:
            conn.execute(update(ResearchLineRow).where(ResearchLineRow.id == line_id,
                                                       ResearchLineRow.prompt_nonce.is_(None))
                         .values(prompt_nonce=secrets.token_hex(16)))
            nonce = conn.scalar(select(ResearchLineRow.prompt_nonce).where(ResearchLineRow.id == line_id))
            if nonce is None:
                raise StoreError(f"research line {line_id} does not exist")
            return str(nonce)

        return self._write("line nonce", work)

    def tag_measurement_version(self: _Plumbing, experiment_ids: Iterable[int], version: int) -> None:
        """Tag the experiments not tagged yet with `version` (a tag, once written, stays)."""
        wanted = sorted(set(experiment_ids))
        if not wanted:
            return

        def work(conn: Connection, _retried: bool) -> None:
            # An id tagged already (earlier, or by another thread at this moment) keeps its tag: ON CONFLICT DO NOTHING.
            insert_missing = _insert_missing(conn, IdeaMemoryRow.__table__, "experiment_id")
            for start in range(0, len(wanted), 500):
                conn.execute(insert_missing, [{"experiment_id": eid, "measurement_version": version}
                                              for eid in wanted[start:start + 500]])

        self._write("tag measurement version", work)

    def measurement_versions(self: _Plumbing, experiment_ids: Iterable[int]) -> dict[int, int]:
        """experiment id -> the measurement version it is tagged with (untagged ids are left out)."""
        wanted = sorted(set(experiment_ids))

        def work(conn: Connection) -> dict[int, int]:
            found: dict[int, int] = {}
            for start in range(0, len(wanted), 500):
                query = select(IdeaMemoryRow.experiment_id, IdeaMemoryRow.measurement_version).where(
                    IdeaMemoryRow.experiment_id.in_(wanted[start:start + 500]))
                found.update({int(eid): int(version) for eid, version in conn.execute(query)})
            return found

        return self._read("measurement versions", work)

    def write_notebook(self: _Plumbing, line_id: int, text: str, author: str, *, session_id: int | None = None,
                       experiment_id: int | None = None) -> NotebookEntry:
        """Add a version of the line's notebook (the newest version is the notebook)."""
        if author not in AUTHORS:
            raise StoreError(f"unknown notebook author {author!r}", hint=f"use one of {', '.join(AUTHORS)}")
        if len(text) > MAX_NOTEBOOK_CHARS:
            raise StoreError(f"the notebook is {len(text)} characters, over the limit of {MAX_NOTEBOOK_CHARS}",
                             hint="shorten it: it is read by the agent at every proposal")
        request_id = str(uuid.uuid4())

        def work(conn: Connection, retried: bool) -> NotebookEntry:
            by_request = select(NotebookRow).where(NotebookRow.request_id == request_id)
            if not (retried and conn.execute(by_request).first() is not None):
                conn.execute(insert(NotebookRow).values(
                    request_id=request_id, line_id=line_id, session_id=session_id, experiment_id=experiment_id,
                    author=author, text=text, created_at=utcnow()))
            return _entry(conn.execute(by_request).one())

        return self._write("write notebook", work)

    def notebook(self: _Plumbing, line_id: int) -> NotebookEntry | None:
        """The line's notebook: its newest entry."""
        query = select(NotebookRow).where(NotebookRow.line_id == line_id).order_by(NotebookRow.id.desc()).limit(1)
        return self._read("read notebook", lambda conn: (
            _entry(row) if (row := conn.execute(query).first()) is not None else None))

    def notebook_history(self: _Plumbing, line_id: int, limit: int = 20) -> list[NotebookEntry]:
        """The line's notebook versions, newest first."""
        query = select(NotebookRow).where(NotebookRow.line_id == line_id).order_by(NotebookRow.id.desc()).limit(limit)
        return self._read("notebook history", lambda conn: [_entry(row) for row in conn.execute(query)])

    def start_smoke_run(self: _Plumbing, session_id: int, description: str, source_hash: str,
                        repair_round: int) -> int:
        """Record a smoke run as running; returns its id (also its sandbox run's number)."""
        request_id = str(uuid.uuid4())

        def work(conn: Connection, retried: bool) -> int:
            by_request = select(SmokeRunRow.id).where(SmokeRunRow.request_id == request_id)
            if not (retried and conn.execute(by_request).first() is not None):
                conn.execute(insert(SmokeRunRow).values(
                    request_id=request_id, session_id=session_id, status="running", repair_round=repair_round,
                    description=description[:500], source_hash=source_hash, error="", log_tail="",
                    created_at=utcnow()))
            return int(conn.execute(by_request).scalar_one())

        return self._write("start smoke run", work)

    def finish_smoke_run(self: _Plumbing, smoke_id: int, status: str, seconds: float, error: str = "",
                         log_tail: str = "") -> None:
        self._write("finish smoke run", lambda conn, _retried: conn.execute(
            update(SmokeRunRow).where(SmokeRunRow.id == smoke_id).values(
                status=status, seconds=seconds, error=error[:2000], log_tail=log_tail[-8000:])))

    def smoke_runs(self: _Plumbing, session_id: int) -> list[SmokeRun]:
        """The session's smoke runs, oldest first."""
        query = select(SmokeRunRow).where(SmokeRunRow.session_id == session_id).order_by(SmokeRunRow.id)
        return self._read("smoke runs", lambda conn: [SmokeRun(
            row.id, row.session_id, row.status, row.repair_round, row.description, row.source_hash, row.seconds,
            row.error, row.log_tail, row.created_at) for row in conn.execute(query)])

    def smoke_counts(self: _Plumbing, session_id: int) -> dict[str, int]:
        query = (select(SmokeRunRow.status, func.count()).where(SmokeRunRow.session_id == session_id)
                 .group_by(SmokeRunRow.status))
        return self._read("smoke counts", lambda conn: {str(status): int(count) for status, count in conn.execute(query)})


def _insert_missing(conn: Connection, table: Any, key: str) -> Any:
    """An INSERT that skips rows whose `key` exists already (ON CONFLICT DO NOTHING, on either database)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing(index_elements=[key])
