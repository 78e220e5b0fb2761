"""The morning report, from a store filled through the real Store API."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.errors import AutoresearchError
from daemon.ops.report import val_bpb_series, write_report
from daemon.store import open_store


@pytest.fixture(scope="module")
def report(filled_session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(filled_session.store, filled_session.session_id, tmp_path_factory.mktemp("reports"))


def test_report_files_are_written(report: Path) -> None:
    """report.md, a real PNG chart and results.tsv land in the session's folder."""
    folder = report.parent
    assert report.name == "report.md" and folder.name.startswith("session-")
    assert (folder / "val_bpb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "results.tsv").read_text().startswith("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n")
    assert "![val_bpb per experiment](val_bpb.png)" in report.read_text()


def test_report_headline_numbers(report: Path) -> None:
    """Best, baseline, delta, noise floor, GPU hours and cost appear with their values."""
    text = report.read_text()
    assert "best val_bpb: 1.165000" in text
    assert "baseline val_bpb: 1.200167 (mean of 3 runs)" in text  # baseline + its noise runs, like the best's mean
    assert "delta vs baseline: -0.035167 (-2.93%)" in text
    assert "noise floor: mean 1.200167, std 0.000764 over 3 runs" in text
    assert "GPU hours: " in text
    assert "agent cost: $0.75" in text


def test_report_counts_experiments_by_status(report: Path) -> None:
    """The status table counts every finished experiment."""
    text = report.read_text()
    for row in ("| kept | 3 |", "| measured | 3 |", "| discarded | 2 |", "| crashed | 1 |", "| timeout | 1 |"):
        assert row in text


def test_report_lists_kept_changes_in_order_with_deltas(report: Path) -> None:
    """Kept changes appear in order with their delta against the previous kept value."""
    text = report.read_text()
    baseline_at = text.index("| 1 |")
    lower_lr_at = text.index("lower LR to 0.03")
    deeper_at = text.index("deeper model (depth 10)")
    assert baseline_at < lower_lr_at < deeper_at
    assert "-0.020000 (-1.67%)" in text
    assert "-0.015000 (-1.27%)" in text


def test_report_escapes_llm_text_in_tables(report: Path) -> None:
    """HTML and pipes in descriptions cannot break the markdown table or inject markup."""
    text = report.read_text()
    assert "<script>" not in text
    assert "&lt;script&gt;" in text and "\\| pipes" in text


def test_best_diff_fence_survives_backticks(report: Path) -> None:
    """A diff containing ``` is wrapped in a longer fence so it stays one code block."""
    text = report.read_text()
    assert "````diff\n-LR = 0.04\n+LR = 0.03\n-DEPTH = 8\n+DEPTH = 10\n```\n````" in text


def test_series_builds_the_staircase(filled_session) -> None:
    """Kept experiments lower the staircase; failures carry no value; order follows the session."""
    points = val_bpb_series(filled_session.store.list_experiments(filled_session.session_id, limit=100))
    assert [p.best_so_far for p in points] == [1.2, 1.2, 1.2, 1.2, 1.18, 1.18, 1.18, 1.18, 1.165, 1.165]
    assert [p.status for p in points if p.failed] == ["crashed", "timeout"]
    assert all(p.val_bpb is None for p in points if p.failed)


def test_unknown_session_is_a_clear_error(filled_session, tmp_path: Path) -> None:
    """Asking for a missing session names the latest one and writes nothing."""
    with pytest.raises(AutoresearchError, match="session 999 does not exist") as info:
        write_report(filled_session.store, 999, tmp_path)
    assert f"--session {filled_session.session_id}" in info.value.hint
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_dir_is_a_clear_error(filled_session, tmp_path: Path) -> None:
    """An out dir that is a file gives an error pointing at --out."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AutoresearchError, match="cannot create the report folder") as info:
        write_report(filled_session.store, filled_session.session_id, blocker)
    assert "--out" in info.value.hint


def test_empty_session_still_reports(tmp_path: Path) -> None:
    """A session with no experiment yet gives a report that says so, and a placeholder chart."""
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.upgrade()
    try:
        session = store.create_session("empty", "manual", "# p\n", {})
        report = write_report(store, session.id, tmp_path / "out")
    finally:
        store.close()
    text = report.read_text()
    assert "No experiment was kept." in text and "No best yet." in text
    assert (report.parent / "val_bpb.png").stat().st_size > 0


def test_report_shows_a_quiet_step_spread(report: Path) -> None:
    """Repeats that trained the same steps are reported without a warning."""
    text = report.read_text()
    assert "- steps per repeat: the same train.py trained 100 to 100 steps" in text
    assert "WARNING: steps per repeat" not in text


def test_report_warns_when_load_set_the_noise(tmp_path: Path) -> None:
    """A baseline repeat that trained far fewer steps in the same budget makes the report warn about the load."""
    from tests.ops.conftest import BASELINE_SOURCE, run_experiment

    store = open_store(f"sqlite:///{tmp_path / 'loaded.db'}")
    store.upgrade()
    try:
        sid = store.create_session("dec07", "manual", "# program\n", {}).id
        run_experiment(store, sid, "baseline", BASELINE_SOURCE, "kept", val_bpb=1.95, steps=261)
        for seed, (value, steps) in enumerate(((2.07, 171), (2.66, 18), (2.73, 14)), start=1):
            run_experiment(store, sid, "noise", BASELINE_SOURCE, "measured", val_bpb=value, seed=seed, steps=steps)
        text = write_report(store, sid, tmp_path / "reports").read_text()
    finally:
        store.close()
    assert "- WARNING: steps per repeat: the same train.py trained 14 to 261 steps" in text
    assert "the machine's load, not the seed" in text
