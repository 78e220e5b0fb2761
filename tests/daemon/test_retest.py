"""The morning re-test on a real (SQLite) store, with a known landscape standing in for sandbox + trainer.

Each source has a true val_bpb; a run's value is that plus a per-seed offset (what a seed does to any source)
plus a small per-run jitter, so pairing by seed matters as it does in real training. The real training path
is covered by tests/e2e/test_retest_training.py.
"""

from __future__ import annotations

import csv
import io
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from daemon.agents.ledger_text import render_ledger
from daemon.config import JudgeConfig, RetestConfig
from daemon.ops.retest_report import night_headline, retest_section
from daemon.research.judge import t_quantile
from daemon.research.ledger import build_ledger
from daemon.research.retest import (
    RETEST_SEED_BASE,
    CachedReserve,
    Retest,
    comparisons,
    keep_results,
    kept_changes,
    night_result,
    paired,
    reserve_seconds,
)
from daemon.research.stop import StopCondition
from daemon.store import open_store
from daemon.store.records import ExperimentRecord
from daemon.store.sql import Store

BASE_SOURCE = "lr = 0.02\n"
GOOD_SOURCE = "lr = 0.04\n"  # truly better by 0.05
NOOP_SOURCE = "lr = 0.04\n# a comment that changes nothing\n"  # truly the same as GOOD_SOURCE
TRUE_VALUE = {BASE_SOURCE: 1.30, GOOD_SOURCE: 1.25, NOOP_SOURCE: 1.25}


@dataclass
class Outcome:
    status: str
    val_bpb: float | None
    error: str = ""


@dataclass
class Window:
    left: float | None = None
    stopping: bool = False

    def time_left(self) -> float | None:
        return self.left

    def signalled(self) -> bool:
        return self.stopping

    def kill_due(self) -> bool:
        return False


@dataclass
class LandscapeRunner:
    """Runs nothing: answers each (source, seed) from the known landscape and records the calls in order."""

    seed_spread: float = 0.01
    jitter: float = 0.001
    fail_source: str | None = None
    window: Window | None = None  # each run takes `run_seconds` of this window's time
    run_seconds: float = 2.0
    calls: list[tuple[int, int, str, int]] = field(default_factory=list)

    def run(self, experiment_id: int, attempt: int, source: str, seed: int, gpu_uuid: str | None = None,
            cancel: object = None, on_stage: object = None) -> Outcome:
        self.calls.append((experiment_id, attempt, source, seed))
        if self.window is not None and self.window.left is not None:
            self.window.left -= self.run_seconds
        if source == self.fail_source:
            return Outcome("crashed", None, "train stage ended failed (exit 1)")
        offset = random.Random(seed).gauss(0.0, self.seed_spread)
        jitter = random.Random(f"{seed}-{source}").gauss(0.0, self.jitter)
        return Outcome("ok", TRUE_VALUE[source] + offset + jitter)


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'retest.db'}")
    opened.upgrade()
    yield opened
    opened.close()


def finished(store: Store, session_id: int, kind: str, source: str, val_bpb: float, *, status: str = "kept",
             parent_id: int | None = None, seed: int = 0, diff: str = "") -> ExperimentRecord:
    """A row measured by the night (queued, claimed, evaluated, then `status`) under `seed`."""
    created = store.create_experiment(session_id, kind, source, parent_id=parent_id, description=kind, seed=seed,
                                      diff=diff)
    claimed = store.claim_next(session_id, "night-owner", "lane0", None, 60.0)
    assert claimed is not None and claimed.id == created.id
    store.transition(created.id, "running", "evaluating")
    return store.transition(created.id, "evaluating", status, val_bpb=val_bpb)


def night(store: Store, *, noop_keep: bool = True) -> tuple[int, dict[str, int]]:
    """Baseline, a noise run, a real keep (GOOD) and, on it, a keep that changes nothing (NOOP)."""
    session = store.create_session("night", "window", "program", {})
    base = finished(store, session.id, "baseline", BASE_SOURCE, 1.30)
    finished(store, session.id, "noise", BASE_SOURCE, 1.301, status="measured", seed=1)
    good = finished(store, session.id, "candidate", GOOD_SOURCE, 1.249, parent_id=base.id, diff="-0.02\n+0.04\n")
    ids = {"base": base.id, "good": good.id}
    if noop_keep:
        noop = finished(store, session.id, "candidate", NOOP_SOURCE, 1.240, parent_id=good.id, diff="+# comment\n")
        ids["noop"] = noop.id
    return session.id, ids


def retest(store: Store, runner: LandscapeRunner, **config: object) -> Retest:
    return Retest(store=store, runner=runner, config=RetestConfig(**config), budget_s=2.0)  # type: ignore[arg-type]


def test_paired_interval_is_students_t_on_the_differences() -> None:
    """Δ is the mean of b - a and the half-width t(0.975, n-1) * sd / sqrt(n)."""
    delta, half = paired([1.0, 1.1, 0.9], [0.99, 1.088, 0.892], 0.95)
    assert delta == pytest.approx(-0.01)
    assert half == pytest.approx(t_quantile(0.975, 2) * 0.002 / math.sqrt(3))
    assert t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-5)
    assert paired([1.0], [0.9], 0.95)[1] is None


def test_runs_alternate_a_b_on_fresh_seeds_shared_by_each_pair(store: Store) -> None:
    """The start best and end best run a b a b ..., each pair under one seed no run of the night used."""
    session_id, _ = night(store, noop_keep=False)
    first = RETEST_SEED_BASE + session_id * 1000
    finished(store, session_id, "remeasure", GOOD_SOURCE, 1.25, status="measured", seed=first)  # planted clash
    runner = LandscapeRunner()
    retest(store, runner, k=3, per_keep=False).run(session_id, Window())
    sources = [source for _, _, source, _ in runner.calls]
    assert sources == [BASE_SOURCE, GOOD_SOURCE] * 3
    seeds = [seed for _, _, _, seed in runner.calls]
    assert seeds[0::2] == seeds[1::2] and len(set(seeds)) == 3
    night_seeds = {r.seed for r in store.list_experiments(session_id=session_id, limit=100)}
    assert not set(seeds) & night_seeds and min(seeds) >= RETEST_SEED_BASE
    sandbox_names = {(experiment_id, attempt) for experiment_id, attempt, _, _ in runner.calls}
    assert len(sandbox_names) == len(runner.calls)


def test_a_second_retest_of_the_night_uses_new_seeds(store: Store) -> None:
    """An on-demand re-test after the window's runs on seeds neither the night nor the first re-test used."""
    session_id, _ = night(store, noop_keep=False)
    runner = LandscapeRunner()
    retest(store, runner, k=2, per_keep=False).run(session_id, Window())
    retest(store, runner, k=2, per_keep=False).run(session_id, Window())
    seeds = [seed for _, _, _, seed in runner.calls]
    assert len(set(seeds)) == 4


def test_retest_runs_are_not_research_runs(store: Store) -> None:
    """The re-test adds no experiment and no noise sample: the judge, planner and crash streak never see it."""
    session_id, _ = night(store)
    before = store.list_experiments(session_id=session_id, limit=100)
    noise = store.noise_floor(session_id)
    retest(store, LandscapeRunner(), k=3).run(session_id, Window())
    assert store.list_experiments(session_id=session_id, limit=100) == before
    assert store.noise_floor(session_id) == noise


def test_a_real_gain_holds_and_a_keep_that_does_nothing_does_not(store: Store) -> None:
    """The night's gain and the real keep hold; the no-op keep's interval includes zero: not held."""
    session_id, ids = night(store)
    found = retest(store, LandscapeRunner(), k=3).run(session_id, Window())
    whole = night_result(found)
    assert whole is not None and whole.verdict == "held" and whole.pairs == 3
    assert whole.delta == pytest.approx(-0.05, abs=0.005)
    results = keep_results(found, kept_changes(store, session_id))
    assert results[ids["good"]].verdict == "held"
    noop = results[ids["noop"]]
    assert noop.verdict == "not held" and noop.interval is not None
    low, high = noop.interval
    assert low < 0 < high


def test_per_keep_retests_reuse_the_night_when_it_is_the_same_pair(store: Store) -> None:
    """With one keep, the night comparison is that keep's re-test: it is not run twice."""
    session_id, ids = night(store, noop_keep=False)
    runner = LandscapeRunner()
    found = retest(store, runner, k=2).run(session_id, Window())
    assert [c.retest.label for c in found] == ["night"] and len(runner.calls) == 4
    assert keep_results(found, kept_changes(store, session_id))[ids["good"]].verdict == "held"


def test_a_window_that_ends_early_skips_the_retest_and_says_why(store: Store) -> None:
    """Too little time for one pair: nothing runs, the report's first line says the re-test was skipped."""
    session_id, _ = night(store)
    runner = LandscapeRunner()
    found = retest(store, runner).run(session_id, Window(left=3.0))  # a pair needs 2 x the 2 s budget
    assert runner.calls == []
    assert all(c.verdict == "skipped" for c in found)
    headline = night_headline(found)
    assert headline.startswith("night gain: not re-tested: the window ended early")


def test_per_keep_retests_only_when_time_allows(store: Store) -> None:
    """With time for the night's pairs only, the keeps are recorded as skipped for lack of time."""
    session_id, ids = night(store)
    window = Window(left=20.0)  # runs take the 2 s budget: the night's 3 pairs leave 8 s, the keeps need 12 s
    runner = LandscapeRunner(window=window)
    found = retest(store, runner, k=3).run(session_id, window)
    assert len(runner.calls) == 6
    keeps = keep_results(found, kept_changes(store, session_id))
    assert keeps[ids["good"]].verdict == "skipped" and "not enough time" in keeps[ids["good"]].retest.note


def test_failed_runs_leave_their_pair_out(store: Store) -> None:
    """A side that crashes on every seed gives no pair: no number, the retest says so."""
    session_id, _ = night(store, noop_keep=False)
    found = retest(store, LandscapeRunner(fail_source=GOOD_SOURCE), k=2, per_keep=False).run(session_id, Window())
    whole = night_result(found)
    assert whole is not None and whole.pairs == 0 and whole.delta is None and whole.failed_runs >= 3
    assert whole.retest.status == "partial"


def test_nothing_kept_means_nothing_to_retest(store: Store) -> None:
    """A night without a keep records why there is no re-test instead of running the baseline against itself."""
    session = store.create_session("quiet", "window", "program", {})
    finished(store, session.id, "baseline", BASE_SOURCE, 1.30)
    runner = LandscapeRunner()
    found = retest(store, runner).run(session.id, Window())
    assert runner.calls == [] and "no change was kept" in night_headline(found)


def test_report_opens_with_the_night_gain_and_the_keeps_table(store: Store) -> None:
    """The report's section starts with 'night gain: Δ ... ± ...' and lists each keep with held / not held."""
    session_id, ids = night(store)
    retest(store, LandscapeRunner(), k=3).run(session_id, Window())
    experiments = store.list_experiments(session_id=session_id, limit=100)
    lines = retest_section(store, session_id, experiments)
    assert lines[0].startswith("**night gain: Δ -0.0") and "± " in lines[0] and "3 fresh seeds" in lines[0]
    assert lines[0].endswith(": held**")
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "keep" not in line}
    assert "| held |" in rows[str(ids["good"])] and "| not held |" in rows[str(ids["noop"])]
    assert any(line.startswith("Keeps that held: 1 of 2") for line in lines)


def test_results_tsv_keeps_upstreams_reading(store: Store) -> None:
    """Re-test rows come after the night's with status `retest`: upstream's analysis.ipynb reading is unchanged."""
    session_id, _ = night(store)
    before = store.results_tsv(session_id)
    retest(store, LandscapeRunner(), k=2).run(session_id, Window())
    after = store.results_tsv(session_id)
    assert after.startswith(before)

    def read(text: str) -> list[dict[str, str]]:  # as analysis.ipynb: sep="\t", status stripped and upper-cased
        return [{**row, "status": row["status"].strip().upper()} for row in csv.DictReader(io.StringIO(text),
                                                                                           delimiter="\t")]

    old, new = read(before), read(after)
    added = new[len(old):]
    assert added and {row["status"] for row in added} == {"RETEST"}
    assert all(len(row) == 5 and float(row["val_bpb"]) > 0 for row in added)
    for status in ("KEEP", "DISCARD", "CRASH"):  # its counts, its kept list and its plot read only these
        assert [r for r in new if r["status"] == status] == [r for r in old if r["status"] == status]
    assert new[0] == old[0]  # its baseline is the first row


def test_the_next_nights_ledger_marks_a_keep_that_did_not_hold(store: Store) -> None:
    """The agent's ledger says which keep did not hold on the re-test, and which did."""
    session_id, ids = night(store)
    retest(store, LandscapeRunner(), k=3).run(session_id, Window())
    view = build_ledger(store, [session_id], session_id, JudgeConfig())
    notes = {change.id: change.retest for change in view.kept}
    assert notes[ids["noop"]].startswith("DID NOT HOLD on re-test")
    assert notes[ids["good"]].startswith("held on re-test")
    rendered = render_ledger(view, lambda body, _limit: body, 20_000)
    text = f"{rendered.stable}\n{rendered.recent}"
    heads = {line.split(":")[0]: line for line in text.splitlines() if line.startswith("## #")}
    assert "DID NOT HOLD on re-test" in heads[f"## #{ids['noop']}"]
    assert "held on re-test" in heads[f"## #{ids['good']}"]


def test_the_transfer_check_compares_at_the_longer_budget(store: Store) -> None:
    """transfer = true: start best vs end best again on the longer-budget runner, recorded at 2 x the budget."""
    session_id, _ = night(store, noop_keep=False)
    longer = LandscapeRunner()
    found = Retest(store=store, runner=LandscapeRunner(), config=RetestConfig(k=2, transfer=True), budget_s=2.0,
                   transfer_runner=longer).run(session_id, Window())
    transfer = next(c for c in found if c.retest.label == "transfer")
    assert transfer.retest.budget_s == 4.0 and transfer.pairs == 2 and transfer.verdict == "held"
    assert len(longer.calls) == 4
    assert comparisons(store, [session_id])[-1].retest.label == "transfer"


def test_the_cli_refuses_a_k_below_one(run_cli, tmp_path: Path) -> None:
    """`autoresearch retest --k 0` is a one-line error before anything is opened or run."""
    done = run_cli("retest", "--k", "0", "--workspace", str(tmp_path / "ws"))
    assert done.returncode != 0 and "--k must be >= 1, got 0" in done.stderr


def test_the_stop_condition_keeps_the_reserve_free_of_new_experiments() -> None:
    """With a reserve, launching stops that long before the deadline; the window itself still ends at it."""
    now = [0.0]
    stop = StopCondition(deadline=1000.0, grace_s=60.0, monotonic=lambda: now[0], reserve=lambda: 300.0)
    now[0] = 650.0
    assert stop.reason() is None and stop.time_left() == 350.0
    now[0] = 700.0
    reason = stop.reason()
    assert reason is not None and reason.startswith("window ended") and "300 s" in reason
    assert stop.time_left() == 300.0 and not stop.kill_due()


def test_the_reserve_is_2k_runs_once_a_change_is_kept_and_never_over_its_cap(store: Store) -> None:
    """No keep: nothing to re-test, no reserve; after a keep 2 k runs (never shorter than the budget), capped."""
    session = store.create_session("night", "window", "program", {})
    base = store.create_experiment(session.id, "baseline", BASE_SOURCE)
    config = RetestConfig(k=3)
    assert reserve_seconds(store, session.id, config, 300.0) == 0.0
    store.claim_next(session.id, "night-owner", "lane0", None, 60.0)
    store.transition(base.id, "running", "evaluating")
    store.transition(base.id, "evaluating", "kept", val_bpb=1.3)
    assert reserve_seconds(store, session.id, config, 300.0) == 0.0
    finished(store, session.id, "candidate", GOOD_SOURCE, 1.25, parent_id=base.id)
    assert reserve_seconds(store, session.id, config, 300.0) == pytest.approx(6 * 300.0)  # runs took ~0 s here
    assert reserve_seconds(store, session.id, config, 300.0, cap_s=900.0) == 900.0
    assert reserve_seconds(store, session.id, RetestConfig(enabled=False), 300.0) == 0.0


def test_a_failed_start_side_does_not_spend_the_end_sides_run(store: Store) -> None:
    """When arm a fails on a seed, arm b is not run on it: the next seed comes at once."""
    session_id, _ = night(store, noop_keep=False)
    runner = LandscapeRunner(fail_source=BASE_SOURCE)
    retest(store, runner, k=2, per_keep=False).run(session_id, Window())
    assert [source for _, _, source, _ in runner.calls] == [BASE_SOURCE] * 3
    assert len({seed for _, _, _, seed in runner.calls}) == 3


def test_the_cached_reserve_rereads_only_after_its_interval_and_survives_a_failed_read() -> None:
    """The stop condition asks often: the store is read at most every 30 s, and a failed read keeps the last value."""
    now, answers, reads = [0.0], [120.0, RuntimeError("database away"), 240.0], []

    def compute() -> float:
        reads.append(now[0])
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    reserve = CachedReserve(compute, every_s=30.0, monotonic=lambda: now[0])
    assert reserve() == 120.0 and reserve() == 120.0 and reads == [0.0]
    now[0] = 31.0
    assert reserve() == 120.0  # the read failed: the last answer stands
    now[0] = 62.0
    assert reserve() == 240.0 and reads == [0.0, 31.0, 62.0]
