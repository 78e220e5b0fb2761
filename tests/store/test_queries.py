"""What the daemon reads back: best, baseline, history, noise floor, dedup hashes, costs, listings, export."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from daemon.errors import StoreError
from daemon.store import Store
from daemon.store.records import AgentCallRecord, ExperimentRecord, NoiseFloor, SessionRecord
from daemon.store.sandbox_jobs import add_sandbox_job


def _finish(store: Store, session: SessionRecord, status: str, kind: str = "candidate",
            description: str = "", **fields: Any) -> ExperimentRecord:
    """Run one experiment through the store to `status` (via evaluating where the graph needs it)."""
    store.create_experiment(session.id, kind, f"print({description!r})\n", description=description)
    claimed = store.claim_next(session.id, "host-a:1", "lane0", None, 60)
    assert claimed is not None
    if status in ("kept", "discarded", "measured"):
        store.transition(claimed.id, "running", "evaluating")
        return store.transition(claimed.id, "evaluating", status, **fields)
    return store.transition(claimed.id, "running", status, **fields)


def test_best_is_the_latest_kept(store: Store, session: SessionRecord) -> None:
    """best() is the incumbent, the experiment kept last (not the lowest single run); discarded ones never count."""
    _finish(store, session, "kept", "baseline", val_bpb=1.00)
    _finish(store, session, "kept", val_bpb=0.97)
    latest = _finish(store, session, "kept", val_bpb=0.98)
    _finish(store, session, "discarded", val_bpb=0.90)
    assert store.best(session.id) == latest


def test_best_is_none_without_kept(store: Store, session: SessionRecord) -> None:
    """A session with no kept experiment has no best."""
    _finish(store, session, "crashed")
    assert store.best(session.id) is None


def test_baseline_is_the_kept_baseline(store: Store, session: SessionRecord) -> None:
    """baseline() returns the session's kept baseline, not candidates."""
    _finish(store, session, "crashed", "baseline")
    baseline = _finish(store, session, "kept", "baseline", val_bpb=1.0)
    _finish(store, session, "kept", val_bpb=0.9)
    assert store.baseline(session.id) == baseline


def test_history_is_last_finished_newest_last(store: Store, session: SessionRecord) -> None:
    """history(limit) gives the last finished experiments in the order they finished, skipping queued ones."""
    finished = [_finish(store, session, "discarded", description=f"try {i}", val_bpb=1 + i / 100)
                for i in range(4)]
    store.create_experiment(session.id, "candidate", "print('queued')\n")
    history = store.history(session.id, 3)
    assert [r.id for r in history] == [r.id for r in finished[1:]]
    assert [r.description for r in history] == ["try 1", "try 2", "try 3"]


def test_noise_floor_mean_and_sample_std(store: Store, session: SessionRecord) -> None:
    """noise_floor is the mean, the sample standard deviation and the count of the noise runs."""
    for seed, value in enumerate([1.0, 1.002, 0.998]):
        store.add_noise(session.id, None, value, seed)
    floor = store.noise_floor(session.id)
    assert floor.n == 3
    assert floor.mean == pytest.approx(1.0)
    assert floor.std == pytest.approx(0.002)


def test_noise_floor_empty(store: Store, session: SessionRecord) -> None:
    """Without samples the mean is unknown and the spread 0."""
    assert store.noise_floor(session.id) == NoiseFloor(mean=None, std=0.0, n=0)


def test_add_noise_rejects_non_finite(store: Store, session: SessionRecord) -> None:
    """A NaN noise sample is refused and nothing is stored."""
    with pytest.raises(StoreError, match="positive finite"):
        store.add_noise(session.id, None, float("nan"), 1)
    assert store.noise_floor(session.id).n == 0


def test_seen_hashes_of_the_session(store: Store, session: SessionRecord) -> None:
    """seen_hashes holds the normalized hashes given for this session's experiments only."""
    store.create_experiment(session.id, "candidate", "a = 1\n", source_hash="h-a")
    store.create_experiment(session.id, "candidate", "b = 1\n", source_hash="h-b")
    store.create_experiment(session.id, "manual", "c = 1\n")
    other = store.create_session("other", "manual", "p", {})
    store.create_experiment(other.id, "candidate", "d = 1\n", source_hash="h-d")
    assert store.seen_hashes(session.id) == {"h-a", "h-b"}


def test_cost_since_sums_later_calls(store: Store, session: SessionRecord) -> None:
    """cost_since adds the dollars of calls made at or after the given time."""
    now = datetime.now(timezone.utc)
    store.record_agent_call(AgentCallRecord("anthropic", "m", cost_usd=5.0, created_at=now - timedelta(days=1)))
    stored = store.record_agent_call(AgentCallRecord("anthropic", "m", input_tokens=1000, output_tokens=200,
                                                     cost_usd=0.25, latency_s=3.5, session_id=session.id))
    store.record_agent_call(AgentCallRecord("anthropic", "m", outcome="error", error="overloaded", cost_usd=0.5))
    assert stored.id is not None and stored.created_at is not None
    assert (stored.input_tokens, stored.session_id) == (1000, session.id)
    assert store.cost_since(now - timedelta(hours=1)) == pytest.approx(0.75)
    assert store.cost_since(now + timedelta(hours=1)) == 0.0


def test_record_agent_call_rejects_negative_tokens(store: Store) -> None:
    """Negative token counts are refused and no call is stored."""
    with pytest.raises(StoreError, match="input_tokens=-1"):
        store.record_agent_call(AgentCallRecord("anthropic", "m", input_tokens=-1, cost_usd=1.0))
    assert store.cost_since(datetime(2000, 1, 1, tzinfo=timezone.utc)) == 0.0


def test_agent_call_outcomes_count_the_session_calls(store: Store, session: SessionRecord) -> None:
    """agent_call_outcomes counts the session's calls per (provider, outcome), other sessions' calls left out."""
    other = store.create_session("other", "manual", "p", {})
    for provider, outcome, session_id in [("anthropic", "ok", session.id), ("anthropic", "ok", session.id),
                                          ("anthropic", "error", session.id), ("offline", "fallback", session.id),
                                          ("anthropic", "ok", other.id), ("anthropic", "ok", None)]:
        store.record_agent_call(AgentCallRecord(provider, "m", outcome=outcome, session_id=session_id))
    assert store.agent_call_outcomes(session.id) == {
        ("anthropic", "ok"): 2, ("anthropic", "error"): 1, ("offline", "fallback"): 1}
    assert store.agent_call_outcomes(other.id) == {("anthropic", "ok"): 1}


def test_cost_since_rejects_naive_time(store: Store) -> None:
    """A datetime without time zone is refused with a hint."""
    with pytest.raises(StoreError, match="no time zone"):
        store.cost_since(datetime(2030, 1, 1))


def test_timestamps_come_back_in_utc(store: Store, session: SessionRecord) -> None:
    """A time given in another zone is stored as the same instant and read back as UTC."""
    berlin = datetime(2030, 6, 1, 23, 30, tzinfo=ZoneInfo("Europe/Berlin"))
    stored = store.record_agent_call(AgentCallRecord("offline", "none", created_at=berlin))
    assert stored.created_at == berlin
    assert stored.created_at is not None and stored.created_at.tzinfo == timezone.utc
    assert session.started_at.tzinfo == timezone.utc


def test_list_experiments_filters(store: Store, session: SessionRecord) -> None:
    """list_experiments filters by session, status and kind, newest first, within the limit."""
    crashed = _finish(store, session, "crashed")
    queued = [store.create_experiment(session.id, "candidate", f"x = {i}\n") for i in range(3)]
    other = store.create_session("other", "manual", "p", {})
    store.create_experiment(other.id, "noise", "y = 1\n")
    assert [r.id for r in store.list_experiments(session.id, "queued")] == [r.id for r in reversed(queued)]
    assert [r.id for r in store.list_experiments(session.id, ("crashed", "kept"))] == [crashed.id]
    assert len(store.list_experiments(session.id, limit=2)) == 2
    assert [r.kind for r in store.list_experiments(kind="noise")] == ["noise"]


def test_sandbox_jobs_are_recorded_once_each_in_submission_order(store: Store, session: SessionRecord) -> None:
    """add_sandbox_job appends `<stage>:<handle>` to its experiment only; the same stage and handle twice is kept once."""
    first = store.create_experiment(session.id, "candidate", "x = 1\n")
    second = store.create_experiment(session.id, "candidate", "x = 2\n")
    assert first.sandbox_jobs is None
    for stage, handle in [("train", "1234"), ("train", "1234"), ("eval", "1235")]:
        add_sandbox_job(store, first.id, stage, handle)
    after = store.get_experiment(first.id)
    assert after is not None and after.sandbox_jobs == "train:1234 eval:1235"
    unchanged = store.get_experiment(second.id)
    assert unchanged is not None and unchanged.sandbox_jobs is None


def test_sessions_newest_first(store: Store, session: SessionRecord) -> None:
    """list_sessions and latest_session see the newest session first."""
    newer = store.create_session("night-2", "window:nightly", "p", {})
    assert store.latest_session() == newer
    assert [s.id for s in store.list_sessions()] == [newer.id, session.id]
    assert store.get_session(987654321) is None


def test_results_tsv_format(store: Store, session: SessionRecord) -> None:
    """results.tsv has the original columns, words and number formats; crashes show zeros."""
    keep = _finish(store, session, "kept", "baseline", "baseline", val_bpb=0.9979, peak_vram_mb=45060.2,
                   commit="a1b2c3d4e5f6")
    discard = _finish(store, session, "discarded", description="lr\t0.04\nand warmup", val_bpb=1.0012,
                      peak_vram_mb=45000.0)
    crash = _finish(store, session, "oom", description="depth 64", peak_vram_mb=80000.0)
    noise = _finish(store, session, "measured", "noise", "seed 2", val_bpb=0.998, peak_vram_mb=1024.0)
    store.create_experiment(session.id, "candidate", "print('not finished')\n")
    assert store.results_tsv(session.id) == (
        "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
        "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n"
        f"{discard.source_sha256[:7]}\t1.001200\t43.9\tdiscard\tlr 0.04 and warmup\n"
        f"{crash.source_sha256[:7]}\t0.000000\t0.0\tcrash\tdepth 64\n"
        f"{noise.source_sha256[:7]}\t0.998000\t1.0\tmeasured\tseed 2\n"
    )
    assert keep.commit == "a1b2c3d4e5f6"
