"""The judge inside a session on a real Postgres store: verdict numbers stored, sequential confirmations,
re-measures of a new best, near-miss moves with two parents, and the morning report's keep explanations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.agents.edits import normalized_hash
from daemon.ops.report import write_report
from daemon.research import ResearchSession
from daemon.research.archive import unified_diff
from daemon.research.measurements import recorded_value
from daemon.research.stop import StopCondition
from daemon.service.runtime import Runtime, open_runtime
from daemon.store.records import ExperimentRecord
from tests.daemon.rows import finished

pytestmark = [pytest.mark.postgres]


@pytest.fixture()
def runtime(tiny_settings: Any) -> Iterator[Runtime]:
    # The worked examples' boundary: Pocock's at 5% per candidate (the defaults are stricter: docs/judge.md).
    rt = open_runtime(tiny_settings(judge={"noise_runs": 2, "remeasure_after_keep": 1, "max_runs": 3, "keep_min_runs": 1,
                                           "search": "archive", "archive_every": 3, "false_keep_rate": 0.05,
                                           "boundary_shape": 0.5}), daemon=False)
    try:
        yield rt
    finally:
        rt.close()


def _open(runtime: Runtime, baseline_source: str, noise: tuple[float, ...] = (2.01, 1.99),
          seeds: tuple[int, ...] | None = None) -> tuple[ResearchSession, int, ExperimentRecord]:
    """A session whose baseline (2.00, seed 0) and noise runs (default 2.01, 1.99 on seeds 1, 2: sigma 0.01,
    df 2) are measured."""
    session = ResearchSession(settings=runtime.settings, store=runtime.store, workspace=runtime.workspace,
                              runner=runtime.runner, agent=runtime.agent, lanes=runtime.lanes[:1],
                              owner=runtime.owner)
    sid = session.open(resume=False).id
    digest = normalized_hash(baseline_source)
    base = finished(runtime.store, sid, "baseline", baseline_source, 2.00, source_hash=digest)
    for seed, value in zip(seeds or range(1, len(noise) + 1), noise, strict=True):
        finished(runtime.store, sid, "noise", baseline_source, value, status="measured", source_hash=digest, seed=seed)
    return session, sid, base


def _evaluating(runtime: Runtime, session: ResearchSession, sid: int, source: str, parent_id: int) -> ExperimentRecord:
    """A candidate claimed by the session's lane and in its eval stage."""
    created = runtime.store.create_experiment(sid, "candidate", source, parent_id=parent_id,
                                              source_hash=normalized_hash(source), description="candidate")
    claimed = session.board.claim(runtime.lanes[0])
    assert claimed is not None and claimed.id == created.id
    return runtime.store.transition(created.id, "running", "evaluating", owner=runtime.owner)


def test_a_keep_stores_its_numbers_and_the_new_best_is_remeasured(runtime: Runtime, baseline_source: str) -> None:
    """A 10 sigma win is kept with its verdict; the next run is a re-measure whose value becomes the record
    (in the store's view, the report's and the agent's)."""
    session, sid, base = _open(runtime, baseline_source)
    candidate = _evaluating(runtime, session, sid, baseline_source + "\nWIN = 1\n", base.id)
    assert session.keeper.record(candidate, 1.90, {"val_bpb": 1.90}) == "kept"
    kept = runtime.store.get_experiment(candidate.id)
    assert kept is not None and kept.verdict is not None
    assert kept.verdict["rule"] == "significant" and kept.verdict["n"] == 1 and kept.verdict["n_incumbent"] == 3
    assert kept.verdict["df"] == 2 and kept.verdict["p"] < kept.verdict["alpha"]
    remeasure = session.work.next_experiment(runtime.lanes[0], StopCondition(grace_s=0))
    assert remeasure is not None and (remeasure.kind, remeasure.parent_id) == ("remeasure", candidate.id)
    assert remeasure.seed != candidate.seed
    runtime.store.transition(remeasure.id, "running", "evaluating", owner=runtime.owner)
    assert session.keeper.record(remeasure, 1.93, {"val_bpb": 1.93}) == "measured"
    rows = runtime.store.list_experiments(session_id=sid, limit=100)
    best = runtime.store.best(sid)
    assert best is not None and best.id == candidate.id
    assert recorded_value(rows, best) == pytest.approx(1.93)
    assert session.briefing.context(None).best_val_bpb == pytest.approx(1.93)  # the agent sees the mean too


def test_a_close_call_is_confirmed_until_its_mean_decides(runtime: Runtime, baseline_source: str) -> None:
    """A first run that wins by 2.5 sigma queues a confirmation; two runs averaging a clearer win are kept."""
    session, sid, base = _open(runtime, baseline_source)
    candidate = _evaluating(runtime, session, sid, baseline_source + "\nCLOSE = 1\n", base.id)
    assert session.keeper.record(candidate, 1.975, {"val_bpb": 1.975}) == "evaluating"
    confirm = session.work.next_experiment(runtime.lanes[0], StopCondition(grace_s=0))
    assert confirm is not None and (confirm.kind, confirm.parent_id) == ("confirm", candidate.id)
    runtime.store.transition(confirm.id, "running", "evaluating", owner=runtime.owner)
    assert session.keeper.record(confirm, 1.965, {"val_bpb": 1.965}) == "measured"
    kept = runtime.store.get_experiment(candidate.id)
    assert kept is not None and kept.status == "kept"
    assert kept.verdict is not None and kept.verdict["n"] == 2
    assert kept.verdict["improvement"] == pytest.approx(2.0 - (1.975 + 1.965) / 2)


def test_a_clear_loss_is_discarded_with_its_numbers(runtime: Runtime, baseline_source: str) -> None:
    """A worse candidate is discarded at its first look (futile), numbers stored, no confirmation queued."""
    session, sid, base = _open(runtime, baseline_source)
    candidate = _evaluating(runtime, session, sid, baseline_source + "\nLOSS = 1\n", base.id)
    assert session.keeper.record(candidate, 2.05, {"val_bpb": 2.05}) == "discarded"
    discarded = runtime.store.get_experiment(candidate.id)
    assert discarded is not None and discarded.verdict is not None and discarded.verdict["rule"] == "futile"
    assert not runtime.store.list_experiments(session_id=sid, kind="confirm")


def test_near_miss_move_records_both_parents(runtime: Runtime, baseline_source: str) -> None:
    """Under search = archive, an archive turn re-applies a near-miss onto the new best: parent and parent2."""
    session, sid, base = _open(runtime, baseline_source)
    near_source = baseline_source + "\nNEAR = 1\n"
    near = finished(runtime.store, sid, "candidate", near_source, 1.99, status="discarded", parent_id=base.id,
                    source_hash=normalized_hash(near_source), diff=unified_diff(baseline_source, near_source),
                    verdict={"t": 1.4, "improvement": 0.01, "sigma": 0.01, "n": 3})
    best_source = "BEST = 1\n" + baseline_source
    best = finished(runtime.store, sid, "candidate", best_source, 1.9, parent_id=base.id,
                    source_hash=normalized_hash(best_source))
    finished(runtime.store, sid, "remeasure", best_source, 1.91, status="measured", parent_id=best.id,
             source_hash=normalized_hash(best_source))
    session.state.planned_candidates = 2  # the next candidate is an archive turn (archive_every = 3)
    move = session.work.next_experiment(runtime.lanes[0], StopCondition(grace_s=0))
    assert move is not None and move.kind == "candidate"
    assert (move.parent_id, move.parent2_id) == (best.id, near.id)
    assert move.source.startswith("BEST = 1\n") and "NEAR = 1" in move.source


def test_report_explains_each_keep_and_lists_near_misses(runtime: Runtime, baseline_source: str,
                                                          tmp_path: Path) -> None:
    """The morning report shows each keep's rule and numbers, the best as a mean, and the closest near-misses."""
    session, sid, base = _open(runtime, baseline_source)
    candidate = _evaluating(runtime, session, sid, baseline_source + "\nWIN = 1\n", base.id)
    session.keeper.record(candidate, 1.90, {"val_bpb": 1.90})
    near_source = baseline_source + "\nNEAR = 1\n"
    near = _evaluating(runtime, session, sid, near_source, candidate.id)
    assert session.keeper.record(near, 1.88, {"val_bpb": 1.88}) == "evaluating"
    session.keeper.abandon(runtime.store.create_experiment(sid, "confirm", near_source, parent_id=near.id), "x")
    text = write_report(runtime.store, sid, tmp_path).read_text()
    assert "## Why each change was kept" in text
    row = next(line for line in text.splitlines() if line.startswith(f"| {candidate.id} | significant |"))
    assert "| 1 vs 3 |" in row and "(2) |" in row
    assert "best val_bpb: 1.900000" in text and "mean of 1 run)" in text
    assert "pooled noise" in text


@pytest.fixture()
def wide_margin(tiny_settings: Any) -> Iterator[Runtime]:
    """A runtime whose simplicity margin is 2 sigma (a test of the mechanism, not of the default)."""
    rt = open_runtime(tiny_settings(judge={"noise_runs": 2, "max_runs": 3, "simplicity_margin_sigma": 2.0}),
                      daemon=False)
    try:
        yield rt
    finally:
        rt.close()


def test_a_removal_at_an_equal_result_is_kept_as_simpler(wide_margin: Runtime, baseline_source: str) -> None:
    """Deleting a statement with no loss: a second run, then kept by the non-inferiority test (counted on code)."""
    runtime = wide_margin
    session, sid, base = _open(runtime, baseline_source, noise=(2.01, 1.99) * 4)
    line = next(text for text in baseline_source.splitlines(keepends=True) if text.startswith("SCALAR_LR = "))
    candidate = _evaluating(runtime, session, sid, baseline_source.replace(line, "", 1), base.id)
    assert session.keeper.record(candidate, 2.004, {"val_bpb": 2.004}) == "evaluating"
    confirm = session.work.next_experiment(runtime.lanes[0], StopCondition(grace_s=0))
    assert confirm is not None and confirm.kind == "confirm" and confirm.seed == 1  # the best's second seed
    runtime.store.transition(confirm.id, "running", "evaluating", owner=runtime.owner)
    session.keeper.record(confirm, 1.994, {"val_bpb": 1.994})
    kept = runtime.store.get_experiment(candidate.id)
    assert kept is not None and kept.status == "kept"
    assert kept.verdict is not None and kept.verdict["rule"] == "simpler"
    assert "non-inferiority" in kept.verdict["reason"]


def test_a_look_without_a_partner_runs_the_best_under_its_seed_first(runtime: Runtime, baseline_source: str) -> None:
    """The best has runs on one seed only: a confirmation takes a fresh seed, and the best's pair run under that
    seed is queued before it (queued rows run oldest first), so that the look has its partner."""
    session, sid, base = _open(runtime, baseline_source, seeds=(0, 0))
    candidate = _evaluating(runtime, session, sid, baseline_source + "\nCLOSE = 1\n", base.id)
    assert session.keeper.record(candidate, 1.975, {"val_bpb": 1.975}) == "evaluating"
    pair = session.work.next_experiment(runtime.lanes[0], StopCondition(grace_s=0))
    assert pair is not None and (pair.kind, pair.parent_id, pair.seed) == ("remeasure", base.id, 1)
    queued = runtime.store.list_experiments(session_id=sid, status="queued", kind="confirm")
    assert [(r.parent_id, r.seed) for r in queued] == [(candidate.id, 1)]


def _fail_next_confirmation(runtime: Runtime, session: ResearchSession, status: str = "timeout") -> ExperimentRecord:
    """The next queued confirmation is claimed and fails with `status`, as the session's runner records it (the
    status first, then the keeper hears of it: `running.py`)."""
    confirm = session.work.next_experiment(runtime.lanes[0], StopCondition(grace_s=0))
    assert confirm is not None and confirm.kind == "confirm"
    runtime.store.transition(confirm.id, "running", status, owner=runtime.owner)
    session.keeper.abandon(confirm, f"its confirmation run {status}")
    return confirm


def test_a_timed_out_confirmation_runs_again_on_its_seed(runtime: Runtime, baseline_source: str) -> None:
    """A confirmation that times out is no evidence against its candidate: the same look is queued again on the
    same seed, the candidate waits, and the retry's run decides (here: kept)."""
    session, sid, base = _open(runtime, baseline_source)
    candidate = _evaluating(runtime, session, sid, baseline_source + "\nCLOSE = 1\n", base.id)
    assert session.keeper.record(candidate, 1.975, {"val_bpb": 1.975}) == "evaluating"
    failed = _fail_next_confirmation(runtime, session)
    current = runtime.store.get_experiment(candidate.id)
    assert current is not None and current.status == "evaluating"
    retry = session.work.next_experiment(runtime.lanes[0], StopCondition(grace_s=0))
    assert retry is not None and (retry.kind, retry.parent_id, retry.seed) == ("confirm", candidate.id, failed.seed)
    runtime.store.transition(retry.id, "running", "evaluating", owner=runtime.owner)
    assert session.keeper.record(retry, 1.965, {"val_bpb": 1.965}) == "measured"
    kept = runtime.store.get_experiment(candidate.id)
    assert kept is not None and kept.status == "kept" and kept.verdict is not None and kept.verdict["n"] == 2


def test_confirmation_retries_are_bounded(runtime: Runtime, baseline_source: str) -> None:
    """A confirmation that keeps timing out is run again `confirm_retries` times, then its candidate is discarded."""
    session, sid, base = _open(runtime, baseline_source)
    candidate = _evaluating(runtime, session, sid, baseline_source + "\nCLOSE = 1\n", base.id)
    assert session.keeper.record(candidate, 1.975, {"val_bpb": 1.975}) == "evaluating"
    for _ in range(runtime.settings.judge.confirm_retries + 1):
        _fail_next_confirmation(runtime, session)
    discarded = runtime.store.get_experiment(candidate.id)
    assert discarded is not None and discarded.status == "discarded"
    assert not runtime.store.list_experiments(session_id=sid, status="queued", kind="confirm")


def test_a_crashed_confirmation_discards_its_candidate(runtime: Runtime, baseline_source: str) -> None:
    """A confirmation whose code crashed is evidence against the change: no retry, the candidate is discarded."""
    session, sid, base = _open(runtime, baseline_source)
    candidate = _evaluating(runtime, session, sid, baseline_source + "\nCLOSE = 1\n", base.id)
    assert session.keeper.record(candidate, 1.975, {"val_bpb": 1.975}) == "evaluating"
    _fail_next_confirmation(runtime, session, status="crashed")
    discarded = runtime.store.get_experiment(candidate.id)
    assert discarded is not None and discarded.status == "discarded"
    assert not runtime.store.list_experiments(session_id=sid, status="queued", kind="confirm")
