"""The morning re-test with real training: tiny CPU preset, local sandbox, a real store (SQLite file).

One short night, run once for the module: a real session measures the baseline and one noise run; then a
change that does nothing (a comment added to train.py) is forced through as a keep, as a judge error would
let it through. The re-test runs the start best (the baseline) against the end best (the no-op keep) on
fresh seeds, a b a b, and the morning report is written. A real gain holding is covered on a known landscape
(tests/daemon/test_retest.py); here the point is the real path and a no-op that must not hold.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.ops.report import write_report
from daemon.research.retest import RETEST_SEED_BASE, Comparison, night_result
from daemon.research.stop import StopCondition
from daemon.research.workspace import Workspace
from daemon.service.retesting import retest_session
from daemon.service.runtime import open_runtime
from daemon.store.records import ExperimentRecord
from daemon.store.retests import RetestRunRecord
from tests.e2e.support import run_session, tiny_settings

pytestmark = [pytest.mark.slow]


@dataclass(frozen=True)
class Night:
    session_id: int
    noop_keep: ExperimentRecord
    night_seeds: set[int]
    found: list[Comparison]
    runs: list[RetestRunRecord]
    report: str
    results_tsv: str


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory, prepared_data: Path, baseline_source: str) -> Iterator[Night]:
    root = tmp_path_factory.mktemp("retest-night")
    workspace = Workspace.init(root / "ws", baseline_source=baseline_source)
    url = f"sqlite:///{root / 'night.db'}"
    # A 5 s budget (not the suite's usual 2 s): the harness allows budget x 1.05 + 3 s, and on a loaded CPU one
    # step can take seconds, so a 2 s baseline ends over budget there before anything is re-tested.
    settings = tiny_settings(workspace.root, url, prepared_data, judge={"noise_runs": 1}, retest={"k": 3},
                             training={"time_budget_s": 5})
    summary, _ = run_session(settings, candidates=0)  # the baseline and one noise run, really trained
    session_id = summary.session_id
    runtime = open_runtime(settings, daemon=False, serve_http=False)
    try:
        store = runtime.store
        baseline = store.baseline(session_id)
        assert baseline is not None and baseline.val_bpb is not None
        noop = store.create_experiment(session_id, "candidate", baseline_source + "\n# changes nothing\n",
                                       parent_id=baseline.id, description="a comment that changes nothing",
                                       diff="+# changes nothing\n", source_hash="noop")
        claimed = store.claim_next(session_id, "forcing-hand", "cpu", None, 60.0)
        assert claimed is not None and claimed.id == noop.id
        store.transition(noop.id, "running", "evaluating")
        noop_keep = store.transition(noop.id, "evaluating", "kept", val_bpb=baseline.val_bpb - 0.01)
        night_seeds = {r.seed for r in store.list_experiments(session_id=session_id, limit=100)}
        found = retest_session(runtime, session_id, StopCondition(grace_s=60))
        runs = store.retest_runs([c.retest.id for c in found])
        report = write_report(store, session_id, workspace.reports_dir).read_text()
    finally:
        runtime.close()
    yield Night(session_id, noop_keep, night_seeds, found, runs, report, workspace.results_path.read_text())


def test_the_retest_runs_start_and_end_best_interleaved_on_fresh_seeds(night: Night) -> None:
    """Arms alternate a b a b; each pair shares a seed no run of the night used; no experiment is added."""
    assert [c.retest.label for c in night.found] == ["night"]
    assert [run.arm for run in night.runs] == ["a", "b"] * (len(night.runs) // 2)
    assert all(a.seed == b.seed for a, b in zip(night.runs[0::2], night.runs[1::2], strict=True))
    assert all(run.seed >= RETEST_SEED_BASE and run.seed not in night.night_seeds for run in night.runs)
    store_rows = [line for line in night.results_tsv.splitlines() if line.split("\t")[3] == "retest"]
    assert len(store_rows) == len(night.runs)


def test_a_keep_that_does_nothing_is_reported_not_held(night: Night) -> None:
    """The no-op keep against its parent, paired on fresh seeds: the interval includes zero, not held."""
    whole = night_result(night.found)
    assert whole is not None and whole.retest.best_id == night.noop_keep.id
    assert whole.pairs >= 2, f"too few pairs measured on this machine: {[(r.status, r.error) for r in night.runs]}"
    assert whole.interval is not None
    low, high = whole.interval
    assert low <= 0 <= high and whole.verdict == "not held"


def test_the_morning_report_opens_with_the_retests_numbers(night: Night) -> None:
    """report.md starts with 'night gain: Δ ... (re-tested on k fresh seeds) ...: not held' and the keeps table."""
    whole = night_result(night.found)
    assert whole is not None and whole.delta is not None
    headline = night.report.splitlines()[2]
    assert headline.startswith(f"**night gain: Δ {whole.delta:+.6f}")
    assert f"(re-tested on {whole.pairs} fresh seeds)" in headline and ": not held" in headline
    noop_row = next(line for line in night.report.splitlines() if line.startswith(f"| {night.noop_keep.id} |"))
    assert "| not held |" in noop_row
