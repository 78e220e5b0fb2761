"""Results: what the judge, the agent's prompt and the export read of a session's finished work.

The incumbent (`best`) and the kept baseline, the prompt's history, the noise floor (the val_bpb of
unchanged re-runs), the agent's dedup set, and `results_tsv`, the session in the original experiment's
results.tsv format.
"""

from __future__ import annotations

import math
import statistics
import uuid
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from daemon.errors import StoreError
from daemon.store.experiments import all_experiments, one_experiment, select_experiments
from daemon.store.models import ExperimentRow, NoiseRow
from daemon.store.records import TERMINAL_STATUSES, ExperimentRecord, NoiseFloor
from daemon.store.sessions import session_by_id
from daemon.store.values import utcnow

T = TypeVar("T")

# results.tsv speaks the original experiment's words.
_TSV_STATUS = {"kept": "keep", "discarded": "discard", "crashed": "crash", "timeout": "crash", "oom": "crash",
               "invalid": "crash"}


class _Plumbing(Protocol):
    def _read(self, what: str, work: Callable[[Connection], T]) -> T: ...

    def _write(self, what: str, work: Callable[[Connection, bool], T]) -> T: ...

    def retest_tsv(self, session_id: int) -> list[tuple[str, str, str, str, str]]: ...


def _one_line(value: str) -> str:
    return " ".join(value.replace("\t", " ").splitlines()).strip()


class ResultQueries:
    """The judge's, the prompt's and the export's part of `daemon.store.sql.Store` (a mixin over its transactions)."""

    def best(self: _Plumbing, session_id: int) -> ExperimentRecord | None:
        """The incumbent: the experiment kept last (each keep beat the one before it, by the judge's rule).

        Not the lowest val_bpb: a single run's value is a noisy draw (the judge compares means), and a
        simpler change may be kept at an equal result.
        """
        query = (select_experiments()
                 .where(ExperimentRow.session_id == session_id, ExperimentRow.status == "kept",
                        ExperimentRow.val_bpb.is_not(None))
                 .order_by(ExperimentRow.finished_at.desc(), ExperimentRow.id.desc()).limit(1))
        return self._read("best", lambda conn: one_experiment(conn, query))

    def baseline(self: _Plumbing, session_id: int) -> ExperimentRecord | None:
        """The session's first baseline that ended `kept`."""
        query = (select_experiments()
                 .where(ExperimentRow.session_id == session_id, ExperimentRow.kind == "baseline",
                        ExperimentRow.status == "kept")
                 .order_by(ExperimentRow.id).limit(1))
        return self._read("baseline", lambda conn: one_experiment(conn, query))

    def history(self: _Plumbing, session_id: int, limit: int) -> list[ExperimentRecord]:
        """The last `limit` finished experiments of the session, oldest first (prompt order)."""
        query = (select_experiments()
                 .where(ExperimentRow.session_id == session_id, ExperimentRow.status.in_(TERMINAL_STATUSES))
                 .order_by(ExperimentRow.finished_at.desc(), ExperimentRow.id.desc()).limit(limit))
        return self._read("history", lambda conn: list(reversed(all_experiments(conn, query))))

    def add_noise(self: _Plumbing, session_id: int, experiment_id: int | None, val_bpb: float, seed: int) -> None:
        """Record one val_bpb of an unchanged re-run, a sample of the noise floor."""
        if not (isinstance(val_bpb, int | float) and math.isfinite(val_bpb) and val_bpb > 0):
            raise StoreError(f"noise val_bpb must be a positive finite number, got {val_bpb!r}")
        request_id = str(uuid.uuid4())

        def work(conn: Connection, retried: bool) -> None:
            if retried and conn.scalar(select(NoiseRow.id).where(NoiseRow.request_id == request_id)) is not None:
                return
            session_by_id(conn, session_id)
            conn.execute(insert(NoiseRow).values(request_id=request_id, session_id=session_id,
                                                 experiment_id=experiment_id, val_bpb=float(val_bpb), seed=seed,
                                                 created_at=utcnow()))

        self._write("add_noise", work)

    def noise_floor(self: _Plumbing, session_id: int) -> NoiseFloor:
        def work(conn: Connection) -> NoiseFloor:
            values = list(conn.scalars(select(NoiseRow.val_bpb).where(NoiseRow.session_id == session_id)))
            if not values:
                return NoiseFloor(mean=None, std=0.0, n=0)
            std = statistics.stdev(values) if len(values) >= 2 else 0.0
            return NoiseFloor(mean=statistics.fmean(values), std=std, n=len(values))

        return self._read("noise_floor", work)

    def seen_hashes(self: _Plumbing, session_id: int) -> set[str]:
        """Normalized-source hashes of every experiment of the session (the agent's dedup set)."""
        query = (select(ExperimentRow.source_hash).distinct()
                 .where(ExperimentRow.session_id == session_id, ExperimentRow.source_hash != ""))
        return self._read("seen_hashes", lambda conn: set(conn.scalars(query)))

    def results_tsv(self: _Plumbing, session_id: int) -> str:
        """The session's finished experiments in the original results.tsv format (tab-separated, header first),
        then its re-test runs (status `retest`: upstream's analysis.ipynb counts and plots only keep/discard/crash
        rows, and takes its baseline from the first row, so rows after the night's change nothing there)."""
        query = (select_experiments()
                 .where(ExperimentRow.session_id == session_id, ExperimentRow.status.in_(TERMINAL_STATUSES))
                 .order_by(ExperimentRow.id))
        records = self._read("results_tsv", lambda conn: all_experiments(conn, query))
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
