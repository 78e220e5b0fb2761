"""The machine's share of the noise: the step spread of one source's repeats (daemon.research.step_spread)."""

from __future__ import annotations

from dataclasses import dataclass

from daemon.research.step_spread import WARN_RATIO, step_spread


@dataclass(frozen=True)
class Row:
    id: int
    source_hash: str
    num_steps: int | None
    status: str = "measured"
    source_sha256: str = ""


def test_no_repeats_no_spread() -> None:
    """Sources run once each have no spread to report."""
    assert step_spread([Row(1, "a", 100), Row(2, "b", 50)]) is None


def test_quiet_repeats_are_not_loaded() -> None:
    """Repeats within a few percent are a quiet machine's."""
    spread = step_spread([Row(1, "a", 261), Row(2, "a", 255), Row(3, "a", 258)])
    assert spread is not None and (spread.fewest, spread.most, spread.runs) == (255, 261, 3)
    assert not spread.loaded and "WARNING" not in spread.text()


def test_loaded_repeats_are_flagged() -> None:
    """A repeat that trained far fewer steps in the same budget flags the machine's load."""
    spread = step_spread([Row(1, "a", 261), Row(2, "a", 171), Row(3, "a", 18)])
    assert spread is not None and spread.loaded and spread.ratio > WARN_RATIO
    assert "18 to 261 steps" in spread.text() and "load" in spread.text()


def test_the_widest_source_is_reported() -> None:
    """Among several repeated sources the widest spread is the one shown."""
    rows = [Row(1, "a", 100), Row(2, "a", 101), Row(3, "b", 90), Row(4, "b", 30)]
    spread = step_spread(rows)
    assert spread is not None and spread.experiment_ids == (3, 4)


def test_exact_bytes_group_when_no_normalized_hash() -> None:
    """Rows stored without a normalized hash are grouped by their exact source's sha256."""
    rows = [Row(1, "", 100, source_sha256="x"), Row(2, "", 40, source_sha256="x"), Row(3, "", 10, source_sha256="y")]
    spread = step_spread(rows)
    assert spread is not None and spread.experiment_ids == (1, 2)


def test_unmeasured_rows_do_not_count() -> None:
    """Crashed runs and runs without a step count are left out."""
    rows = [Row(1, "a", 100), Row(2, "a", 5, status="crashed"), Row(3, "a", None), Row(4, "a", 0)]
    assert step_spread(rows) is None
