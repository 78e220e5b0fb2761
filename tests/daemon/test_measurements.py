"""The runs the judge reads (`daemon.research.measurements`): pooled noise, the best's runs and recorded value."""

from __future__ import annotations

import math

import pytest

from daemon.research.measurements import (
    differences,
    incumbent_rows,
    incumbent_runs,
    noise_of,
    paired_groups,
    recorded_value,
    runs_of,
)
from tests.daemon.rows import row


def test_noise_pools_every_repeated_source() -> None:
    """Baseline + noise runs and a candidate + its confirmation are two groups; crashes and singles add nothing."""
    rows = [row(1, "baseline", "kept", 1.00, source_hash="b"), row(2, "noise", "measured", 1.02, source_hash="b"),
            row(3, "candidate", "discarded", 0.90, source_hash="c"),
            row(4, "confirm", "measured", 0.92, source_hash="c", parent_id=3),
            row(5, "candidate", "crashed", None, source_hash="d"), row(6, "candidate", "kept", 0.8, source_hash="e")]
    noise = noise_of(rows)
    assert noise.df == 2
    assert noise.sigma == pytest.approx(math.sqrt((0.0002 + 0.0002) / 2))


def test_noise_counts_a_candidate_still_being_judged() -> None:
    """A first run not stored yet joins its source's group through `extra`."""
    rows = [row(1, "confirm", "measured", 0.92, source_hash="c", parent_id=9)]
    assert noise_of(rows, extra={"c": [0.90]}).df == 1


def test_baseline_best_is_judged_on_all_its_runs() -> None:
    """The baseline's runs: itself, its noise runs and its re-measures."""
    rows = [row(1, "baseline", "kept", 1.00, source_hash="b"), row(2, "noise", "measured", 1.02, source_hash="b"),
            row(3, "remeasure", "measured", 1.01, source_hash="b", parent_id=1)]
    assert incumbent_runs(rows, rows[0]) == [1.00, 1.02, 1.01]


def test_kept_candidate_is_judged_on_fresh_runs_once_there_are_any() -> None:
    """The runs that won a keep are replaced by re-measures made after it (no winner's curse)."""
    best = row(3, "candidate", "kept", 0.90, source_hash="c")
    confirm = row(4, "confirm", "measured", 0.91, source_hash="c", parent_id=3)
    assert incumbent_runs([best, confirm], best) == [0.90, 0.91]
    fresh = row(5, "remeasure", "measured", 0.95, source_hash="c", parent_id=3)
    assert incumbent_runs([best, confirm, fresh], best) == [0.95]
    assert recorded_value([best, confirm, fresh], best) == pytest.approx(0.95)


def test_runs_of_a_candidate_include_its_confirmations() -> None:
    """A candidate's runs: its own measured run and its measured confirmations, not other candidates'."""
    rows = [row(3, "candidate", "discarded", 0.90), row(4, "confirm", "measured", 0.92, parent_id=3),
            row(5, "confirm", "crashed", None, parent_id=3), row(6, "confirm", "measured", 0.5, parent_id=7)]
    assert runs_of(rows, 3) == [0.90, 0.92]


def test_differences_pair_each_look_with_the_incumbent_run_on_its_seed() -> None:
    """Incumbent run - candidate run on the same seed, in look order."""
    reference = [row(1, "baseline", "kept", 1.00, source_hash="b", seed=0),
                 row(2, "noise", "measured", 1.02, source_hash="b", seed=1)]
    assert differences([(1, 1.0), (0, 0.99)], reference) == pytest.approx([0.02, 0.01])


def test_differences_are_none_when_a_look_has_no_partner() -> None:
    """A look under a seed the incumbent never ran (the best changed mid-candidate): pairing is broken."""
    reference = [row(1, "baseline", "kept", 1.00, source_hash="b", seed=0)]
    assert differences([(0, 0.99), (7, 0.98)], reference) is None
    assert differences([], reference) is None


def test_paired_groups_come_from_stored_verdicts() -> None:
    """Each judged candidate's stored differences are one group; rows without them add nothing."""
    rows = [row(4, "candidate", "discarded", 1.0, verdict={"differences": [0.01, 0.02]}),
            row(5, "candidate", "discarded", 1.0, verdict={"differences": []}),
            row(6, "candidate", "kept", 0.9, verdict=None)]
    assert paired_groups(rows) == [[0.01, 0.02]]


def test_incumbent_rows_of_a_kept_best_are_its_fresh_runs() -> None:
    """The rows a kept best is compared on are its re-measures once there are any (their seeds pair looks)."""
    best = row(4, "candidate", "kept", 0.90, source_hash="c")
    fresh = row(6, "remeasure", "measured", 0.95, source_hash="c", parent_id=4, seed=2)
    assert [r.id for r in incumbent_rows([best, fresh], best)] == [6]
    assert [r.id for r in incumbent_rows([best], best)] == [4]
