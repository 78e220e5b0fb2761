"""SQLAlchemy table models of the store (sessions, experiments, agent calls, noise measurements).

The models only define tables; `daemon.store.sql.Store` queries them with Core statements and hands
callers frozen records, never live ORM objects. Every table has a client-made `request_id` (unique)
so that a create retried after a dropped connection finds its first, committed attempt instead of
inserting twice, and `change_id` marks the last update made by a retried operation.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    Postgres stores `timestamptz`; SQLite has no time zones, so values are stored as naive UTC text
    (which also keeps SQLite's text comparisons chronological) and made aware again when read.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} given: pass a timezone-aware datetime (UTC)")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


class SessionRow(Base):
    """One research session: a window, a night, an idle stretch or a manual run."""

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(36), unique=True)
    change_id: Mapped[str | None] = mapped_column(String(36))
    tag: Mapped[str] = mapped_column(String(200))
    trigger: Mapped[str] = mapped_column(String(50))
    program_md: Mapped[str] = mapped_column(Text)
    program_sha256: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20))
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]


class ExperimentRow(Base):
    """One proposed train.py and everything measured about it, with its lease while it runs."""

    __tablename__ = "experiments"
    __table_args__ = (
        Index("ix_experiments_session_status", "session_id", "status"),
        Index("ix_experiments_status_lease", "status", "lease_expires_at"),
        Index("ix_experiments_change_id", "change_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(36), unique=True)
    change_id: Mapped[str | None] = mapped_column(String(36))
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id", ondelete="SET NULL"))
    kind: Mapped[str] = mapped_column(String(20))
    lane: Mapped[str | None] = mapped_column(String(100))
    gpu_uuid: Mapped[str | None] = mapped_column(String(100))
    attempt: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20))
    description: Mapped[str] = mapped_column(Text)
    hypothesis: Mapped[str] = mapped_column(Text)
    diff: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text)
    source_sha256: Mapped[str] = mapped_column(String(64))
    source_hash: Mapped[str] = mapped_column(String(64))
    commit: Mapped[str] = mapped_column(String(64))
    val_bpb: Mapped[float | None] = mapped_column(Float)
    training_seconds: Mapped[float | None] = mapped_column(Float)
    total_seconds: Mapped[float | None] = mapped_column(Float)
    peak_vram_mb: Mapped[float | None] = mapped_column(Float)
    mfu_percent: Mapped[float | None] = mapped_column(Float)
    total_tokens_m: Mapped[float | None] = mapped_column(Float)
    num_steps: Mapped[int | None] = mapped_column(Integer)
    num_params_m: Mapped[float | None] = mapped_column(Float)
    depth: Mapped[int | None] = mapped_column(Integer)
    eval_seconds: Mapped[float | None] = mapped_column(Float)
    probe: Mapped[str] = mapped_column(Text)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    oom: Mapped[bool] = mapped_column(Boolean)
    log_tail: Mapped[str] = mapped_column(Text)
    error: Mapped[str] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # The judge's numbers for this experiment's keep/discard (see daemon.research.judge.Verdict.as_record).
    verdict: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # A combine move: the earlier change merged onto `parent_id` (the best at the time).
    parent2_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id", ondelete="SET NULL",
                                                              name="fk_experiments_parent2_id"))
    # The sandbox's handles of this experiment's stages as they were submitted: "train:1234 eval:1235".
    sandbox_jobs: Mapped[str | None] = mapped_column(Text)


class AgentCallRow(Base):
    """One request to an LLM (or the offline agent): tokens, dollars, latency, outcome."""

    __tablename__ = "agent_calls"
    __table_args__ = (Index("ix_agent_calls_created_at", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(36), unique=True)
    session_id: Mapped[int | None] = mapped_column(ForeignKey("sessions.id", ondelete="SET NULL"))
    experiment_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id", ondelete="SET NULL"))
    provider: Mapped[str] = mapped_column(String(50))
    model: Mapped[str] = mapped_column(String(100))
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    cache_read_tokens: Mapped[int] = mapped_column(Integer)
    cache_write_tokens: Mapped[int] = mapped_column(Integer)
    cost_usd: Mapped[float] = mapped_column(Float)
    latency_s: Mapped[float] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(String(50))
    error: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]


class NoiseRow(Base):
    """One val_bpb of an unchanged baseline re-run (another seed): the judge's noise floor sample."""

    __tablename__ = "noise"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(36), unique=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    experiment_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id", ondelete="SET NULL"))
    val_bpb: Mapped[float] = mapped_column(Float)
    seed: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]
