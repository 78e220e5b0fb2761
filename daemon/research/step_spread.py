"""The machine's share of the noise: how far the step counts of one source's repeats spread.

A run trains for a time budget, so a repeat of the same `train.py` trains the same number of steps give or
take a few percent, whatever its seed. When the machine is shared (another job on the cores, a neighbour on the
GPU, throttling), a repeat trains fewer steps and scores worse: the noise floor then measures the machine's load,
not the seed, and a candidate that ran on a quieter machine than its incumbent wins by the load alone.
`step_spread(rows)` finds the widest spread among the line's repeated sources (baseline + noise runs, a
candidate + its confirmations, the best + its re-measures); the morning report warns above `WARN_RATIO`.
The step counts are each run's own printed summary (the harness cannot count a candidate's steps): a candidate
can misreport its own, which raises or hides the warning for its source and nothing else; no number the judge
uses comes from them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from daemon.research.measurements import MEASURED

# Above this max/min ratio of steps among repeats of one source, the load, not the seed, is the noise. A quiet
# machine repeats within a few percent (timer granularity, the warm-up's share); 20% is far outside that.
WARN_RATIO = 1.2


class StepRow(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def status(self) -> str: ...
    @property
    def source_hash(self) -> str: ...
    @property
    def source_sha256(self) -> str: ...
    @property
    def num_steps(self) -> int | None: ...


@dataclass(frozen=True)
class StepSpread:
    runs: int  # repeats of the source with a step count
    fewest: int
    most: int
    experiment_ids: tuple[int, ...]  # the repeats, oldest first

    @property
    def ratio(self) -> float:
        return self.most / max(self.fewest, 1)

    @property
    def loaded(self) -> bool:
        return self.ratio > WARN_RATIO

    def text(self) -> str:
        ids = ", ".join(str(i) for i in self.experiment_ids[:8]) + (", ..." if len(self.experiment_ids) > 8 else "")
        line = (f"the same train.py trained {self.fewest} to {self.most} steps in the same budget "
                f"({self.runs} runs: experiments {ids})")
        if self.loaded:
            line += (": the machine's load, not the seed, set these runs' val_bpb, and the noise floor measures it; "
                     "run on a quiet machine (or give the lane its own cores/GPU) before trusting keeps")
        return line


def step_spread(rows: Iterable[StepRow]) -> StepSpread | None:
    """The widest step spread among repeats of one source (None: no source repeated with step counts)."""
    groups: dict[str, list[StepRow]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r.id):
        key = row.source_hash or row.source_sha256  # the normalized source when known, else the exact bytes
        if row.status in MEASURED and row.num_steps is not None and row.num_steps > 0 and key:
            groups[key].append(row)
    spreads = [StepSpread(runs=len(group), fewest=min(r.num_steps or 0 for r in group),
                          most=max(r.num_steps or 0 for r in group),
                          experiment_ids=tuple(r.id for r in group))
               for group in groups.values() if len(group) >= 2]
    return max(spreads, key=lambda s: (s.ratio, s.runs), default=None)
