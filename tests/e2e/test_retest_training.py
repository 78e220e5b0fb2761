"""The morning re-test with real training: tiny CPU preset, local sandbox, a real store (SQLite file).

One short night, run once for the module: the baseline is a handicapped train.py (learning rates of 1e-7),
the noise floor one more seed, then the real train.py as a hand-written candidate (judged by the real judge:
a real gain), then a change that does nothing (a comment) forced through as a keep on top of it. The
re-test then runs start best against end best, and each keep against its parent, on fresh seeds, and the
morning report is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.ops.report import write_report
from daemon.research import ResearchSession
from daemon.research.retest import RETEST_SEED_BASE, Comparison, keep_results, kept_changes, night_result
from daemon.research.stop import StopCondition
from daemon.research.workspace import Workspace
from daemon.service.retesting import retest_session
from daemon.service.runtime import open_runtime
from daemon.store import open_store
from daemon.store.records import ExperimentRecord
from tests.e2e.support import handicapped, run_session, tiny_settings

pytestmark = [pytest.mark.slow]


@dataclass(frozen=True)
class Night:
    session_id: int
    real_keep: ExperimentRecord
    noop_keep: ExperimentRecord
    found: list[Comparison]
    report: str
    database_url: str


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory, prepared_data: Path, baseline_source: str) -> Iterator[Night]:
    root = tmp_path_factory.mktemp("retest-night")
    workspace = Workspace.init(root / "ws", baseline_source=handicapped(baseline_source))
    url = f"sqlite:///{root / 'night.db'}"
    settings = tiny_settings(workspace.root, url, prepared_data, judge={"noise_runs": 1}, retest={"k": 3})
    summary, _ = run_session(settings, candidates=0)  # baseline + one noise run
    session_id = summary.session_id
    store = open_store(url)
    try:
        baseline = store.baseline(session_id)
        assert baseline is not None
        store.create_experiment(session_id, "manual", baseline_source, parent_id=baseline.id,
                                description="the real learning rates", source_hash="real-lrs")
    finally:
        store.close()
    runtime = open_runtime(settings, daemon=False, serve_http=False)
    try:
        judged = ResearchSession(settings=settings, store=runtime.store, workspace=runtime.workspace,
                                 runner=runtime.runner, agent=runtime.agent, lanes=runtime.lanes[:1],
                                 owner=runtime.owner, trigger="try", max_experiments=0)
        judged.open(attach_to=session_id)
        judged.run(StopCondition(grace_s=60))
        store = runtime.store
        real_keep = store.best(session_id)
        assert real_keep is not None and real_keep.kind == "manual", "the judge did not keep the real train.py"
        # A change that does nothing, forced through as a keep (as a judge error would let it through).
        noop = store.create_experiment(session_id, "candidate", baseline_source + "\n# changes nothing\n",
                                       parent_id=real_keep.id, description="a comment that changes nothing",
                                       diff="+# changes nothing\n", source_hash="noop")
        claimed = store.claim_next(session_id, "forcing-hand", "cpu", None, 60.0)
        assert claimed is not None and claimed.id == noop.id
        store.transition(noop.id, "running", "evaluating")
        noop_keep = store.transition(noop.id, "evaluating", "kept", val_bpb=(real_keep.val_bpb or 0.0) - 0.01)
        found = retest_session(runtime, session_id, StopCondition(grace_s=60))
        report = write_report(store, session_id, workspace.reports_dir).read_text()
    finally:
        runtime.close()
    yield Night(session_id, real_keep, noop_keep, found, report, url)


def test_the_retest_measures_the_nights_gain_on_fresh_seeds(night: Night) -> None:
    """Start best (handicapped) vs end best: k = 3 pairs on re-test seeds, the gain holds."""
    whole = night_result(night.found)
    assert whole is not None and whole.pairs == 3 and whole.failed_runs == 0
    assert whole.delta is not None and whole.delta < 0 and whole.verdict == "held"
    store = open_store(night.database_url)
    try:
        runs = store.retest_runs([whole.retest.id])
        night_seeds = {r.seed for r in store.list_experiments(session_id=night.session_id, limit=100)}
    finally:
        store.close()
    assert [run.arm for run in runs] == ["a", "b"] * 3
    assert all(run.seed >= RETEST_SEED_BASE and run.seed not in night_seeds for run in runs)


def test_a_keep_that_does_nothing_is_reported_not_held(night: Night) -> None:
    """The forced no-op keep's interval against its parent includes zero: not held; the real keep held."""
    store = open_store(night.database_url)
    try:
        results = keep_results(night.found, kept_changes(store, night.session_id))
    finally:
        store.close()
    noop = results[night.noop_keep.id]
    assert noop.pairs == 3 and noop.interval is not None
    low, high = noop.interval
    assert low <= 0 <= high and noop.verdict == "not held"
    assert results[night.real_keep.id].verdict == "held"


def test_the_morning_report_opens_with_the_retests_numbers(night: Night) -> None:
    """report.md starts with 'night gain: Δ ... ± ... (re-tested on 3 fresh seeds)' and the keeps table."""
    lines = night.report.splitlines()
    assert lines[2].startswith("**night gain: Δ -") and "(re-tested on 3 fresh seeds)" in lines[2]
    whole = night_result(night.found)
    assert whole is not None and whole.delta is not None and f"{whole.delta:+.6f}" in lines[2]
    noop_row = next(line for line in lines if line.startswith(f"| {night.noop_keep.id} |"))
    assert "| not held |" in noop_row
    assert "Keeps that held: 1 of 2 re-tested (50%)." in night.report
