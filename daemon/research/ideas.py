"""The research line's idea memory, built from the store: every change tried on any night, deduplicated.

For each finished candidate (or manual) experiment: its normalized change against its parent
(`daemon.agents.ideas.change_of`), its outcome, its effect (its mean minus its parent's recorded value
when it ran, the ledger's delta) with a standard error from the line's pooled noise, and the measurement
version it was measured under. Experiments are tagged with `MEASUREMENT_VERSION` the first time the
memory sees them finished (those from before the tagging existed are version 1, see migration
0006_idea_memory). Repeats of one change fold into one idea.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

from daemon.agents.ideas import Change, Idea, IdeaMemory, change_of, renamed_key
from daemon.research import measurements
from daemon.store.records import ExperimentRecord

# What val_bpb means: bump when the eval or the training clock changes. 1: up to the eval split of the
# last round. 2: this round's one training clock (compile counts, fixed slack) and eval changes.
MEASUREMENT_VERSION = 2
FINISHED = ("kept", "discarded", "crashed", "timeout", "oom", "invalid")
IDEA_KINDS = ("candidate", "manual")


class IdeaStore(Protocol):
    def tag_measurement_version(self, experiment_ids: Sequence[int], version: int) -> None: ...

    def measurement_versions(self, experiment_ids: Sequence[int]) -> dict[int, int]: ...


def idea_memory(store: IdeaStore, rows: Sequence[ExperimentRecord], nights: int = 1,
                retests: Mapping[int, str] | None = None) -> IdeaMemory:
    """The memory of the line whose experiments are `rows`; tags newly finished ones with the current version."""
    finished = [row.id for row in rows if row.status in FINISHED]
    versions = store.measurement_versions(finished)
    untagged = [eid for eid in finished if eid not in versions]
    if untagged:
        store.tag_measurement_version(untagged, MEASUREMENT_VERSION)
        versions.update({eid: MEASUREMENT_VERSION for eid in untagged})
    return memory_from_rows(rows, versions, nights=nights, retests=retests)


def memory_from_rows(rows: Sequence[ExperimentRecord], versions: Mapping[int, int], nights: int = 1,
                     retests: Mapping[int, str] | None = None) -> IdeaMemory:
    """The memory of `rows` (pure): one idea per distinct change, oldest first."""
    ordered = sorted(rows, key=lambda row: row.id)
    by_id = {row.id: row for row in ordered}
    sigma = measurements.noise_of(ordered).sigma or None
    ideas: dict[str, Idea] = {}
    for row in ordered:
        parent = by_id.get(row.parent_id) if row.parent_id is not None else None
        if row.kind not in IDEA_KINDS or row.status not in FINISHED or parent is None:
            continue
        read = _read_change(row, parent)
        if read is None:
            continue  # an unparsable source never ran
        change, renamed = read
        effect, runs, parent_runs = effect_of(ordered, row, parent)
        se = sigma * math.sqrt(1 / runs + 1 / parent_runs) if sigma and runs and parent_runs else None
        outcome = (retests or {}).get(row.id) or row.status
        version = versions.get(row.id, MEASUREMENT_VERSION)
        earlier = ideas.get(change.key)
        ids = (*earlier.experiment_ids, row.id) if earlier is not None else (row.id,)
        if earlier is not None and earlier.outcome == "kept" and outcome != "kept":
            ideas[change.key] = Idea(earlier.change, earlier.renamed_key, ids, earlier.description, earlier.outcome,
                                     earlier.effect, earlier.se, earlier.runs, earlier.version)
            continue
        ideas[change.key] = Idea(change, renamed, ids, row.description, outcome, effect, se, runs, version)
    return IdeaMemory(tuple(sorted(ideas.values(), key=lambda idea: idea.experiment_ids[0])),
                      MEASUREMENT_VERSION, nights)


# (ids and source hashes of the experiment and its parent) -> its change and renamed key: parsing every source
# of a long line at each proposal would cost seconds (the key holds no source, so the cache stays small).
_CHANGES: dict[tuple[int, int, int, int], tuple[Change, str] | None] = {}


def _read_change(row: ExperimentRecord, parent: ExperimentRecord) -> tuple[Change, str] | None:
    key = (row.id, parent.id, hash(row.source), hash(parent.source))
    if key not in _CHANGES:
        try:
            _CHANGES[key] = (change_of(parent.source, row.source), renamed_key(row.source))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            _CHANGES[key] = None
    return _CHANGES[key]


def effect_of(ordered: Sequence[ExperimentRecord], row: ExperimentRecord,
              parent: ExperimentRecord) -> tuple[float | None, int, int]:
    """(its mean minus the parent's recorded value when it ran, its runs, the parent's runs)."""
    own = measurements.runs_of(ordered, row.id)
    before = [other for other in ordered if other.id < row.id]
    theirs = measurements.incumbent_runs(before, parent) if parent.id < row.id else []
    if not own or not theirs:
        return None, len(own), len(theirs)
    return math.fsum(own) / len(own) - math.fsum(theirs) / len(theirs), len(own), len(theirs)
