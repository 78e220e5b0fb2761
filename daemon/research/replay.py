"""Replay detection: the same source under a different seed must not give a bit-identical result.

Noise-floor and confirmation runs re-run one source under fresh seeds; a candidate that ignores
AUTORESEARCH_SEED (or carries its result in from elsewhere) would turn them into replays and fake a zero
noise floor or a confirmation. The runner remembers, per source (by SHA-256), each scored run's seed,
checkpoint SHA-256 and exact val_bpb, and refuses a run that matches another seed's run bit for bit.
The memory is per runner (one daemon process), bounded, and kept only for scored runs.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

MAX_SOURCES = 4096
MAX_RUNS_PER_SOURCE = 32


@dataclass(frozen=True)
class ScoredRun:
    seed: int
    checkpoint_sha256: str
    val_bpb: float


class ReplayGuard:
    """Remembers scored runs by source; `check` refuses a bit-identical result under another seed."""

    def __init__(self) -> None:
        self._runs: OrderedDict[str, list[ScoredRun]] = OrderedDict()

    def check(self, source: str, seed: int, checkpoint_sha256: str, val_bpb: float) -> str:
        """'' and the run is remembered, or why it is a replay of an earlier run of the same source."""
        key = hashlib.sha256(source.encode("utf-8", errors="surrogatepass")).hexdigest()
        runs = self._runs.setdefault(key, [])
        self._runs.move_to_end(key)
        for run in runs:
            if run.seed == seed:
                continue  # a retry or a re-measurement under the same seed may match
            if checkpoint_sha256 and run.checkpoint_sha256 == checkpoint_sha256:
                return (f"replay: the checkpoint is byte-identical to the one this same code exported under seed "
                        f"{run.seed} (this run had seed {seed}): the candidate ignores AUTORESEARCH_SEED")
            if run.val_bpb == val_bpb:
                return (f"replay: val_bpb {val_bpb!r} is bit-identical to this same code's run under seed {run.seed} "
                        f"(this run had seed {seed}): the candidate ignores AUTORESEARCH_SEED")
        runs.append(ScoredRun(seed, checkpoint_sha256, val_bpb))
        del runs[:-MAX_RUNS_PER_SOURCE]
        while len(self._runs) > MAX_SOURCES:
            self._runs.popitem(last=False)
        return ""
