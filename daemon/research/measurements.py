"""The runs of a research line as the judge reads them: repeats grouped by source, the incumbent's mean.

Pure functions over store rows (anything with the `RunRow` attributes), so that the session, the
morning report, the ledger and `bench/judge_sim.py` read the same numbers:
- `noise_of(rows)`: sigma pooled over every source that was measured more than once (baseline + noise
  runs, a candidate + its confirmations, the best + its re-measures).
- `incumbent_runs(rows, best)`: the runs the best is judged on. For the baseline, all of its runs. For a
  kept change, the fresh runs made after its keep (`remeasure`) once there are any: the runs that won
  the keep were selected for being good (winner's curse), fresh ones are not; until then, its own runs.
- `recorded_value(rows, best)`: the best's recorded val_bpb, the mean of `incumbent_runs`.
- `differences(looks, incumbent_rows(rows, best))`: seed-paired differences (incumbent run - candidate run
  on the same seed), and `paired_groups(rows)`: those stored with earlier verdicts, from which the judge
  pools the noise of one paired difference (`daemon.research.judge.paired_noise`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Protocol

from daemon.research.judge import Noise, pooled_noise
from daemon.research.prior import Evidence

MEASURED = ("kept", "discarded", "measured")  # statuses of rows whose val_bpb is a trusted measurement


class RunRow(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def val_bpb(self) -> float | None: ...
    @property
    def source_hash(self) -> str: ...
    @property
    def parent_id(self) -> int | None: ...
    @property
    def seed(self) -> int: ...


def measured(rows: Iterable[RunRow]) -> list[RunRow]:
    """Rows with a trusted val_bpb, oldest first."""
    return sorted((r for r in rows if r.status in MEASURED and r.val_bpb is not None
                   and math.isfinite(r.val_bpb)), key=lambda r: r.id)


def repeat_groups(rows: Iterable[RunRow], extra: dict[str, Sequence[float]] | None = None) -> list[list[float]]:
    """val_bpb values grouped by normalized source (one group per source); `extra` adds values not stored yet."""
    groups: dict[str, list[float]] = defaultdict(list)
    for row in measured(rows):
        groups[row.source_hash or f"#{row.id}"].append(float(row.val_bpb or 0.0))
    for key, values in (extra or {}).items():
        groups[key].extend(float(v) for v in values)
    return list(groups.values())


def noise_of(rows: Iterable[RunRow], extra: dict[str, Sequence[float]] | None = None) -> Noise:
    """The pooled noise of the session's repeats (see `daemon.research.judge.pooled_noise`)."""
    return pooled_noise(repeat_groups(rows, extra))


def runs_of(rows: Iterable[RunRow], experiment_id: int) -> list[float]:
    """A candidate's measured runs: its own (when measured) and those of its confirmations, oldest first."""
    found = [r for r in measured(rows)
             if r.id == experiment_id or (r.kind == "confirm" and r.parent_id == experiment_id)]
    return [float(r.val_bpb or 0.0) for r in found]


def fresh_runs(rows: Iterable[RunRow], best: RunRow) -> list[float]:
    """Re-measures of `best` made after it was kept."""
    return [float(r.val_bpb or 0.0) for r in measured(rows) if r.kind == "remeasure" and r.parent_id == best.id]


def incumbent_rows(rows: Sequence[RunRow], best: RunRow) -> list[RunRow]:
    """The measured rows the best is compared on, oldest first: see the module docstring."""
    found = measured(rows)
    if best.kind == "baseline":
        own = [r for r in found if r.source_hash == best.source_hash and r.kind in ("baseline", "noise", "remeasure")]
    else:
        own = [r for r in found if r.kind == "remeasure" and r.parent_id == best.id] or \
            [r for r in found if r.id == best.id or (r.kind == "confirm" and r.parent_id == best.id)]
    return own or ([best] if best.val_bpb is not None else [])


def incumbent_runs(rows: Sequence[RunRow], best: RunRow) -> list[float]:
    """The runs the best is compared on: see the module docstring."""
    return [float(r.val_bpb or 0.0) for r in incumbent_rows(rows, best)]


def look_rows(rows: Iterable[RunRow], experiment_id: int) -> list[RunRow]:
    """A candidate's measured looks: its own row (when measured) and its confirmations, oldest first."""
    return [r for r in measured(rows) if r.id == experiment_id or (r.kind == "confirm" and r.parent_id == experiment_id)]


def differences(looks: Sequence[tuple[int, float]], reference: Sequence[RunRow]) -> list[float] | None:
    """Incumbent - candidate on each look's seed (`looks`: (seed, val_bpb)); None when a look has no incumbent
    run under its seed (pairing broken: the best changed mid-candidate, or its pair run is not measured yet)."""
    by_seed: dict[int, list[float]] = defaultdict(list)
    for row in reference:
        by_seed[row.seed].append(float(row.val_bpb or 0.0))
    if not looks or any(seed not in by_seed for seed, _ in looks):
        return None
    return [math.fsum(by_seed[seed]) / len(by_seed[seed]) - value for seed, value in looks]


def paired_groups(rows: Iterable[RunRow]) -> list[list[float]]:
    """The paired differences stored with every judged candidate's verdict (one group per candidate)."""
    groups = []
    for row in rows:
        verdict = getattr(row, "verdict", None)
        if isinstance(verdict, dict) and verdict.get("differences"):
            groups.append([float(d) for d in verdict["differences"]])
    return groups


def judged_evidence(rows: Iterable[RunRow], removals: bool = False) -> list[Evidence]:
    """Each judged candidate's estimated effect and its standard error, in sigma, from its stored verdict: the
    data from which the posterior rule learns the line's distribution of effects (`daemon.research.prior`).
    `removals`: only the changes that remove code (`Verdict.removes_code`), else only the
    others (the two are judged against different nulls, and their effects are spread differently)."""
    found = []
    for row in rows:
        verdict = getattr(row, "verdict", None)
        if row.kind not in ("candidate", "manual") or row.status not in ("kept", "discarded") \
                or not isinstance(verdict, dict):
            continue
        if bool(verdict.get("removes_code")) is not removals:
            continue
        sigma, improvement = verdict.get("sigma"), verdict.get("improvement")
        se = verdict.get("se")
        if se is None and verdict.get("t"):  # a verdict stored before `se` was: t = (improvement - extra) / se
            se = (float(improvement or 0.0) - float(verdict.get("extra_gain") or 0.0)) / float(verdict["t"])
        if not (isinstance(sigma, int | float) and sigma > 0 and isinstance(improvement, int | float)
                and isinstance(se, int | float) and se > 0):
            continue
        found.append(Evidence(float(improvement) / sigma, float(se) / sigma))
    return found


def recorded_value(rows: Sequence[RunRow], best: RunRow) -> float | None:
    """The best's recorded val_bpb: the mean of its `incumbent_runs` (None when it has none)."""
    runs = incumbent_runs(rows, best)
    return math.fsum(runs) / len(runs) if runs else None
