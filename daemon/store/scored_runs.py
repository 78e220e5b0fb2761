"""Scored runs: each scored run's seed, checkpoint SHA-256 and exact val_bpb per source, for the replay guard.

`daemon.research.replay.StoredReplayGuard` checks every scored run (baseline, noise floor, candidate,
confirmation, re-measurement: whatever path it took through the runner) against the earlier runs of the
same source (SHA-256 of train.py) under other seeds, in every session and daemon process that shared this
database, and records it in the same transaction. A run that replays an earlier one is not recorded.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

from sqlalchemy import Float, ForeignKey, Integer, String, insert, or_, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapped, mapped_column

from daemon.errors import StoreError
from daemon.store.models import Base
from daemon.store.values import utcnow

T = TypeVar("T")
# pg_advisory_xact_lock(class, key): this class id keeps the per-source keys apart from other advisory locks.
_PG_LOCK_CLASS = 4_711_0005
_SHA256_LENGTH = 64


class ScoredRunRow(Base):
    """One scored run of a source: its seed, its checkpoint's SHA-256 and its exact val_bpb."""

    __tablename__ = "scored_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(36), unique=True)
    source_sha256: Mapped[str] = mapped_column(String(64), index=True)
    seed: Mapped[int] = mapped_column(Integer)
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))  # "" when the eval stage reported none
    val_bpb: Mapped[float] = mapped_column(Float)
    experiment_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id", ondelete="SET NULL"))
    created_at: Mapped[datetime]


@dataclass(frozen=True)
class ScoredRun:
    """An earlier scored run of a source (what a replay is reported against)."""

    seed: int
    checkpoint_sha256: str
    val_bpb: float
    experiment_id: int | None = None


class _Plumbing(Protocol):
    def _write(self, what: str, work: Callable[[Connection, bool], T]) -> T: ...


def _require_sha256(value: str, name: str, *, empty_ok: bool) -> None:
    if value == "" and empty_ok:
        return
    if len(value) != _SHA256_LENGTH or any(c not in "0123456789abcdef" for c in value):
        raise StoreError(f"{name} {value[:80]!r} is not a lowercase hex SHA-256",
                         hint="pass hashlib.sha256(...).hexdigest()" + (" or ''" if empty_ok else ""))


def _lock_source(conn: Connection, source_sha256: str) -> None:
    """Postgres: serialize the check-and-record of one source (two lanes finishing the same source at once)."""
    if conn.dialect.name == "postgresql":
        key = int(source_sha256[:8], 16) - 2**31  # a signed 32-bit key from the hash
        conn.execute(text("SELECT pg_advisory_xact_lock(CAST(:class_id AS integer), CAST(:key AS integer))"),
                     {"class_id": _PG_LOCK_CLASS, "key": key})
    # SQLite: store writes take the database's write lock at BEGIN IMMEDIATE, so they are serialized already.


class ScoredRunQueries:
    """The replay guard's part of `daemon.store.sql.Store` (a mixin over its transactions)."""

    def record_scored_run(self: _Plumbing, source_sha256: str, seed: int, checkpoint_sha256: str, val_bpb: float,
                          experiment_id: int | None = None) -> ScoredRun | None:
        """Record a scored run unless it replays one: None once recorded, else the earlier run it replays.

        A replay is an earlier run of the same source under another seed with the same checkpoint SHA-256
        (when one is given) or the exact same val_bpb. Runs under the same seed may match (a retry or a
        re-measurement). The lookup is one indexed, LIMIT 1 query by source.
        """
        _require_sha256(source_sha256, "source_sha256", empty_ok=False)
        _require_sha256(checkpoint_sha256, "checkpoint_sha256", empty_ok=True)
        if not (isinstance(val_bpb, int | float) and math.isfinite(val_bpb)):
            raise StoreError(f"scored run val_bpb must be a finite number, got {val_bpb!r}")
        request_id = str(uuid.uuid4())
        same_result = ScoredRunRow.val_bpb == float(val_bpb)
        if checkpoint_sha256:
            same_result = or_(ScoredRunRow.checkpoint_sha256 == checkpoint_sha256, same_result)
        earlier = (select(ScoredRunRow.seed, ScoredRunRow.checkpoint_sha256, ScoredRunRow.val_bpb,
                          ScoredRunRow.experiment_id)
                   .where(ScoredRunRow.source_sha256 == source_sha256, ScoredRunRow.seed != seed, same_result)
                   .order_by(ScoredRunRow.id).limit(1))

        def work(conn: Connection, retried: bool) -> ScoredRun | None:
            if retried and conn.scalar(select(ScoredRunRow.id).where(ScoredRunRow.request_id == request_id)):
                return None  # an earlier attempt recorded it, then lost its connection
            _lock_source(conn, source_sha256)
            row = conn.execute(earlier).first()
            if row is not None:
                return ScoredRun(int(row.seed), str(row.checkpoint_sha256), float(row.val_bpb), row.experiment_id)
            conn.execute(insert(ScoredRunRow).values(
                request_id=request_id, source_sha256=source_sha256, seed=seed, checkpoint_sha256=checkpoint_sha256,
                val_bpb=float(val_bpb), experiment_id=experiment_id, created_at=utcnow()))
            return None

        return self._write("record scored run", work)
