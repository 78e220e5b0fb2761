"""Re-tests: the night's start best against its end best (and each keep against its parent) on fresh seeds.

A re-test (`retests`) compares two experiments' sources, `base` (the start best, or a keep's parent) and
`best` (the end best, or the keep), over paired runs on seeds no run of the night used; each run is one row
of `retest_runs` (arm "a" runs `base`, arm "b" runs `best`, both under the same seed). Re-test runs are not
experiments: the judge, the planner, the crash streak and the agent's dedup never see them.
`daemon.research.retest` plans and runs them and turns the pairs into a difference with its interval.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

from sqlalchemy import Float, ForeignKey, Integer, String, Text, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapped, mapped_column

from daemon.errors import StoreError
from daemon.store.models import Base, ExperimentRow
from daemon.store.values import utcnow

T = TypeVar("T")
RETEST_LABELS = ("night", "keep", "transfer")
RETEST_STATUSES = ("running", "done", "partial", "skipped")
ARMS = ("a", "b")


class RetestRow(Base):
    """One paired comparison of two sources (or a note that it was skipped, and why)."""

    __tablename__ = "retests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(36), unique=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(20))
    base_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id", ondelete="SET NULL"))
    best_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id", ondelete="SET NULL"))
    budget_s: Mapped[float] = mapped_column(Float)
    k: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20))
    note: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]


class RetestRunRow(Base):
    """One run of a re-test: which side, which source, which seed, and what it measured."""

    __tablename__ = "retest_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(36), unique=True)
    retest_id: Mapped[int] = mapped_column(ForeignKey("retests.id", ondelete="CASCADE"), index=True)
    arm: Mapped[str] = mapped_column(String(1))
    experiment_id: Mapped[int | None] = mapped_column(ForeignKey("experiments.id", ondelete="SET NULL"))
    seed: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20))
    val_bpb: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]


@dataclass(frozen=True)
class RetestRecord:
    id: int
    session_id: int
    label: str
    base_id: int | None
    best_id: int | None
    budget_s: float
    k: int
    status: str
    note: str
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class RetestRunRecord:
    id: int
    retest_id: int
    arm: str
    experiment_id: int | None
    seed: int
    status: str
    val_bpb: float | None
    error: str
    created_at: datetime


_RETEST_COLUMNS = [getattr(RetestRow, name) for name in RetestRecord.__dataclass_fields__]
_RUN_COLUMNS = [getattr(RetestRunRow, name) for name in RetestRunRecord.__dataclass_fields__]


class _Plumbing(Protocol):
    def _read(self, what: str, work: Callable[[Connection], T]) -> T: ...

    def _write(self, what: str, work: Callable[[Connection, bool], T]) -> T: ...


def _one_retest(conn: Connection, request_id: str) -> RetestRecord | None:
    row = conn.execute(select(*_RETEST_COLUMNS).where(RetestRow.request_id == request_id)).first()
    return None if row is None else RetestRecord(**row._asdict())


class RetestQueries:
    """The re-test's part of `daemon.store.sql.Store` (a mixin over its transactions)."""

    def create_retest(self: _Plumbing, session_id: int, label: str, *, base_id: int | None, best_id: int | None,
                      budget_s: float, k: int, status: str = "running", note: str = "") -> RetestRecord:
        """Start a re-test (status `running`), or record one that was `skipped` (with why, in `note`)."""
        if label not in RETEST_LABELS:
            raise StoreError(f"unknown re-test label {label!r}", hint=f"use one of {', '.join(RETEST_LABELS)}")
        if status not in ("running", "skipped"):
            raise StoreError(f"a re-test starts running or skipped, not {status!r}")
        if not (math.isfinite(budget_s) and budget_s > 0) or k < 1:
            raise StoreError(f"a re-test needs a positive budget and k >= 1, got {budget_s!r} and {k!r}")
        request_id = str(uuid.uuid4())

        def work(conn: Connection, retried: bool) -> RetestRecord:
            if retried and (earlier := _one_retest(conn, request_id)) is not None:
                return earlier
            now = utcnow()
            conn.execute(insert(RetestRow).values(
                request_id=request_id, session_id=session_id, label=label, base_id=base_id, best_id=best_id,
                budget_s=float(budget_s), k=k, status=status, note=note[:2000], created_at=now,
                finished_at=now if status == "skipped" else None))
            created = _one_retest(conn, request_id)
            assert created is not None
            return created

        return self._write("create retest", work)

    def finish_retest(self: _Plumbing, retest_id: int, status: str, note: str = "") -> None:
        """End a running re-test: `done` (every pair ran), `partial` (time or runs ran out: `note` says which)."""
        if status not in ("done", "partial"):
            raise StoreError(f"a re-test finishes done or partial, not {status!r}")

        def work(conn: Connection, _retried: bool) -> None:
            conn.execute(update(RetestRow).where(RetestRow.id == retest_id, RetestRow.status == "running")
                         .values(status=status, note=note[:2000], finished_at=utcnow()))

        self._write("finish retest", work)

    def add_retest_run(self: _Plumbing, retest_id: int, arm: str, experiment_id: int | None, seed: int,
                       status: str, val_bpb: float | None, error: str = "") -> RetestRunRecord:
        """Record one finished run of a re-test (its status as the runner classified it)."""
        if arm not in ARMS:
            raise StoreError(f"a re-test run's arm is 'a' or 'b', not {arm!r}")
        if val_bpb is not None and not math.isfinite(val_bpb):
            raise StoreError(f"a re-test run's val_bpb must be finite, got {val_bpb!r}")
        request_id = str(uuid.uuid4())
        by_request = select(*_RUN_COLUMNS).where(RetestRunRow.request_id == request_id)

        def work(conn: Connection, retried: bool) -> RetestRunRecord:
            if not retried or (row := conn.execute(by_request).first()) is None:
                conn.execute(insert(RetestRunRow).values(
                    request_id=request_id, retest_id=retest_id, arm=arm, experiment_id=experiment_id, seed=seed,
                    status=status[:20], val_bpb=val_bpb, error=error[:2000], created_at=utcnow()))
                row = conn.execute(by_request).one()
            return RetestRunRecord(**row._asdict())

        return self._write("add retest run", work)

    def retests(self: _Plumbing, session_ids: Sequence[int]) -> list[RetestRecord]:
        """The re-tests of these sessions, oldest first."""
        query = select(*_RETEST_COLUMNS).where(RetestRow.session_id.in_(list(session_ids))).order_by(RetestRow.id)
        return self._read("retests", lambda conn: [RetestRecord(**row._asdict()) for row in conn.execute(query)])

    def retest_runs(self: _Plumbing, retest_ids: Sequence[int]) -> list[RetestRunRecord]:
        """The runs of these re-tests, in the order they ran."""
        query = (select(*_RUN_COLUMNS).where(RetestRunRow.retest_id.in_(list(retest_ids)))
                 .order_by(RetestRunRow.id))
        return self._read("retest runs", lambda conn: [RetestRunRecord(**row._asdict()) for row in conn.execute(query)])

    def retest_tsv(self: _Plumbing, session_id: int) -> list[tuple[str, str, str, str, str]]:
        """The session's re-test runs as results.tsv rows, after the night's (`Store.results_tsv`)."""
        commit = func.coalesce(func.nullif(ExperimentRow.commit, ""), ExperimentRow.source_sha256)
        query = (select(*_RETEST_COLUMNS, *[c.label(f"run_{c.key}") for c in _RUN_COLUMNS], commit.label("code"))
                 .join(RetestRunRow, RetestRunRow.retest_id == RetestRow.id)
                 .outerjoin(ExperimentRow, ExperimentRow.id == RetestRunRow.experiment_id)
                 .where(RetestRow.session_id == session_id).order_by(RetestRunRow.id))

        def work(conn: Connection) -> list[tuple[str, str, str, str, str]]:
            found = []
            for row in conn.execute(query):
                data = row._asdict()
                retest = RetestRecord(**{name: data[name] for name in RetestRecord.__dataclass_fields__})
                run = RetestRunRecord(**{name: data[f"run_{name}"] for name in RetestRunRecord.__dataclass_fields__})
                found.append((retest, run, str(data["code"] or "")))
            return tsv_rows(found)

        return self._read("retest tsv", work)


def tsv_rows(runs: Sequence[tuple[RetestRecord, RetestRunRecord, str]]) -> list[tuple[str, str, str, str, str]]:
    """results.tsv rows of re-test runs (status `retest`; a failed run reads as val_bpb 0, like a crash)."""
    rows = []
    for retest, run, commit in runs:
        side = "start" if run.arm == "a" else "end"
        if retest.label == "keep":
            side = "parent" if run.arm == "a" else "keep"
        value = run.val_bpb if run.status == "measured" and run.val_bpb is not None else 0.0
        rows.append((commit[:7], f"{value:.6f}", "0.0", "retest",
                     f"re-test {retest.label} #{retest.id}: {side} (experiment {run.experiment_id}) seed {run.seed}"
                     + ("" if run.status == "measured" else f" {run.status}")))
    return rows


__all__ = ["ARMS", "RETEST_LABELS", "RETEST_STATUSES", "RetestQueries", "RetestRecord", "RetestRow",
           "RetestRunRecord", "RetestRunRow"]
