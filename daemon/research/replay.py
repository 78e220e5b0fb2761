"""Replay detection: the same source under a different seed must not give a bit-identical result.

Noise-floor and confirmation runs re-run one source under fresh seeds; a candidate that ignores
AUTORESEARCH_SEED (or carries its result in from elsewhere) would turn them into replays and fake a zero
noise floor or a confirmation. The runner checks each scored run's seed, checkpoint SHA-256 and exact
val_bpb against the earlier runs of the same source (by SHA-256) and refuses one that matches another
seed's run bit for bit; a run under the same seed may match (a retry or a re-measurement).

Two memories, one rule. `StoredReplayGuard`, the daemon's (built from its store), keeps the runs in the
store's `scored_runs` table: it survives daemon restarts and spans sessions, research lines and the daemons
sharing one database. `ReplayGuard` keeps them in process, bounded: for runners without a store (smoke
runs, `autoresearch gpu-smoke`, tests, benchmarks), where a restart forgets earlier seeds.
Only scored runs are remembered, and a replay is not.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from typing import Protocol

from daemon.store.scored_runs import ScoredRun

MAX_SOURCES = 4096
MAX_RUNS_PER_SOURCE = 32
_SHA256 = re.compile(r"[0-9a-f]{64}")

__all__ = ["MAX_RUNS_PER_SOURCE", "MAX_SOURCES", "ReplayGuard", "Replays", "ScoredRun", "StoredReplayGuard"]


class Replays(Protocol):
    """What the runner asks after each scored run: '' (and the run is remembered), or why it is a replay."""

    def check(self, source: str, seed: int, checkpoint_sha256: str, val_bpb: float,
              experiment_id: int | None = None) -> str: ...


class ScoredRunStore(Protocol):
    """The store's part that `StoredReplayGuard` needs (`daemon.store.Store` has it)."""

    def record_scored_run(self, source_sha256: str, seed: int, checkpoint_sha256: str, val_bpb: float,
                          experiment_id: int | None = None) -> ScoredRun | None: ...


def source_sha256(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8", errors="surrogatepass")).hexdigest()


def _checkpoint_key(checkpoint_sha256: str) -> str:
    """The checkpoint's SHA-256 as the eval stage reported it, or a SHA-256 of whatever else it reported."""
    if not checkpoint_sha256 or _SHA256.fullmatch(checkpoint_sha256):
        return checkpoint_sha256
    return hashlib.sha256(checkpoint_sha256.encode("utf-8", errors="surrogatepass")).hexdigest()


def _replays(run: ScoredRun, seed: int, checkpoint_sha256: str, val_bpb: float) -> bool:
    if run.seed == seed:
        return False  # a retry or a re-measurement under the same seed may match
    return bool(checkpoint_sha256 and run.checkpoint_sha256 == checkpoint_sha256) or run.val_bpb == val_bpb


def _explain(run: ScoredRun, seed: int, checkpoint_sha256: str, val_bpb: float) -> str:
    earlier = f"seed {run.seed}" + (f" (experiment #{run.experiment_id})" if run.experiment_id is not None else "")
    if checkpoint_sha256 and run.checkpoint_sha256 == checkpoint_sha256:
        return (f"replay: the checkpoint is byte-identical to the one this same code exported under {earlier} "
                f"(this run had seed {seed}): the candidate ignores AUTORESEARCH_SEED")
    return (f"replay: val_bpb {val_bpb!r} is bit-identical to this same code's run under {earlier} "
            f"(this run had seed {seed}): the candidate ignores AUTORESEARCH_SEED")


class ReplayGuard:
    """In-process memory of scored runs by source (the last `MAX_RUNS_PER_SOURCE` of `MAX_SOURCES` sources)."""

    def __init__(self) -> None:
        self._runs: OrderedDict[str, list[ScoredRun]] = OrderedDict()
        self._lock = threading.Lock()  # lanes finish runs in their own threads

    def check(self, source: str, seed: int, checkpoint_sha256: str, val_bpb: float,
              experiment_id: int | None = None) -> str:
        """'' and the run is remembered, or why it is a replay of an earlier run of the same source."""
        key, checkpoint = source_sha256(source), _checkpoint_key(checkpoint_sha256)
        with self._lock:
            runs = self._runs.setdefault(key, [])
            self._runs.move_to_end(key)
            for run in runs:
                if _replays(run, seed, checkpoint, val_bpb):
                    return _explain(run, seed, checkpoint, val_bpb)
            runs.append(ScoredRun(seed, checkpoint, val_bpb, experiment_id))
            del runs[:-MAX_RUNS_PER_SOURCE]
            while len(self._runs) > MAX_SOURCES:
                self._runs.popitem(last=False)
        return ""


class StoredReplayGuard:
    """Scored runs remembered in the store: one check-and-record transaction per run, by source SHA-256."""

    def __init__(self, store: ScoredRunStore) -> None:
        self._store = store

    def check(self, source: str, seed: int, checkpoint_sha256: str, val_bpb: float,
              experiment_id: int | None = None) -> str:
        """'' and the run is recorded in the store, or why it is a replay of an earlier run of the same source."""
        checkpoint = _checkpoint_key(checkpoint_sha256)
        earlier = self._store.record_scored_run(source_sha256(source), seed, checkpoint, val_bpb, experiment_id)
        return "" if earlier is None else _explain(earlier, seed, checkpoint, val_bpb)
