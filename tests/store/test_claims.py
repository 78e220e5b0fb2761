"""Claims with leases: FIFO, concurrency (threads and processes), renewal, expiry and orphans."""

from __future__ import annotations

import multiprocessing
import threading
from datetime import datetime, timedelta, timezone

import pytest

from daemon.errors import StoreError, TransitionError
from daemon.store import Store, open_store
from daemon.store.records import SessionRecord

SOURCE = "print('train')\n"
QUEUED = 30


def _queue(store: Store, session: SessionRecord, count: int) -> list[int]:
    return [store.create_experiment(session.id, "candidate", f"{SOURCE}# {i}\n").id for i in range(count)]


def _claim_all(url: str, owner: str) -> list[int]:
    store = open_store(url, retry_seconds=30)
    session = store.latest_session()
    assert session is not None
    claimed = []
    while (record := store.claim_next(session.id, owner, owner, None, 60)) is not None:
        claimed.append(record.id)
    store.close()
    return claimed


def _claim_all_into(url: str, owner: str, results: multiprocessing.Queue) -> None:
    results.put(_claim_all(url, owner))


def test_claim_takes_oldest_and_sets_lease(store: Store, session: SessionRecord) -> None:
    """claim_next takes the oldest queued experiment and records owner, lane, GPU, lease and start."""
    first, _second = _queue(store, session, 2)
    before = datetime.now(timezone.utc)
    claimed = store.claim_next(session.id, "host-a:7", "lane0", "GPU-abc", 120)
    assert claimed is not None and claimed.id == first
    assert claimed.status == "running"
    assert (claimed.lease_owner, claimed.lane, claimed.gpu_uuid) == ("host-a:7", "lane0", "GPU-abc")
    assert claimed.started_at is not None and claimed.started_at >= before
    assert claimed.lease_expires_at is not None
    assert claimed.lease_expires_at - claimed.started_at == timedelta(seconds=120)


def test_claim_returns_none_when_queue_empty(store: Store, session: SessionRecord) -> None:
    """Nothing queued in this session (only in another one): claim_next returns None."""
    other = store.create_session("other", "manual", "p", {})
    store.create_experiment(other.id, "candidate", SOURCE)
    assert store.claim_next(session.id, "host-a:1", "lane0", None, 60) is None


def test_claim_rejects_bad_lease(store: Store, session: SessionRecord) -> None:
    """A non-positive lease is refused and nothing is claimed."""
    (queued,) = _queue(store, session, 1)
    with pytest.raises(StoreError, match="lease_seconds"):
        store.claim_next(session.id, "host-a:1", "lane0", None, 0)
    assert store.get_experiment(queued).status == "queued"  # type: ignore[union-attr]


def test_two_threads_never_claim_the_same(store: Store, store_url: str, session: SessionRecord) -> None:
    """Two threads claiming concurrently take every queued experiment exactly once."""
    ids = _queue(store, session, QUEUED)
    results: dict[str, list[int]] = {}

    def worker(owner: str) -> None:
        results[owner] = _claim_all(store_url, owner)

    threads = [threading.Thread(target=worker, args=(f"thread-{n}",)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    claimed = results["thread-0"] + results["thread-1"]
    assert sorted(claimed) == ids


def test_two_processes_never_claim_the_same(store: Store, store_url: str, session: SessionRecord) -> None:
    """Two processes claiming concurrently take every queued experiment exactly once."""
    ids = _queue(store, session, QUEUED)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=_claim_all_into, args=(store_url, f"proc-{n}", results)) for n in range(2)]
    for process in processes:
        process.start()
    claimed = results.get(timeout=60) + results.get(timeout=60)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert sorted(claimed) == ids


def test_renew_lease_extends_expiry(store: Store, session: SessionRecord) -> None:
    """The owner can push its lease's expiry forward."""
    _queue(store, session, 1)
    claimed = store.claim_next(session.id, "host-a:1", "lane0", None, 10)
    assert claimed is not None and claimed.lease_expires_at is not None
    expires = store.renew_lease(claimed.id, "host-a:1", 3600)
    assert expires > claimed.lease_expires_at
    assert store.get_experiment(claimed.id).lease_expires_at == expires  # type: ignore[union-attr]


def test_renew_lease_by_other_owner_raises(store: Store, session: SessionRecord) -> None:
    """Only the lease holder can renew; anyone else gets a TransitionError and the lease is unchanged."""
    _queue(store, session, 1)
    claimed = store.claim_next(session.id, "host-a:1", "lane0", None, 10)
    assert claimed is not None
    with pytest.raises(TransitionError, match="lease not renewed"):
        store.renew_lease(claimed.id, "host-b:1", 3600)
    assert store.get_experiment(claimed.id) == claimed


def test_requeue_expired_requeues_only_expired(store: Store, session: SessionRecord) -> None:
    """Expired leases go back to queued with attempt + 1 and no lease; live leases stay."""
    _queue(store, session, 3)
    short = store.claim_next(session.id, "host-a:1", "lane0", None, 10)
    evaluating = store.claim_next(session.id, "host-a:1", "lane1", None, 10)
    long = store.claim_next(session.id, "host-b:1", "lane0", None, 3600)
    assert short and evaluating and long
    store.transition(evaluating.id, "running", "evaluating")
    later = datetime.now(timezone.utc) + timedelta(seconds=60)
    assert store.requeue_expired(later) == [short.id, evaluating.id]
    requeued = store.get_experiment(short.id)
    assert requeued is not None
    assert (requeued.status, requeued.attempt, requeued.lease_owner, requeued.lease_expires_at) == (
        "queued", 2, None, None)
    assert store.get_experiment(long.id).status == "running"  # type: ignore[union-attr]
    assert store.requeue_expired(later) == []


def test_requeued_experiment_can_be_claimed_again(store: Store, session: SessionRecord) -> None:
    """After expiry a new owner claims the experiment; the old owner can no longer finish it."""
    _queue(store, session, 1)
    first = store.claim_next(session.id, "host-a:1", "lane0", None, 10)
    assert first is not None
    store.requeue_expired(datetime.now(timezone.utc) + timedelta(seconds=60))
    second = store.claim_next(session.id, "host-b:1", "lane0", None, 60)
    assert second is not None and second.id == first.id and second.lease_owner == "host-b:1"
    with pytest.raises(TransitionError):
        store.transition(first.id, "running", "crashed", owner="host-a:1")


def test_requeue_expired_rejects_naive_time(store: Store) -> None:
    """A datetime without time zone is refused with a hint."""
    with pytest.raises(StoreError, match="no time zone"):
        store.requeue_expired(datetime(2030, 1, 1))


def test_interrupt_orphans_marks_only_that_owner(store: Store, session: SessionRecord) -> None:
    """Active experiments of exactly that owner become interrupted with the reason; others stay."""
    _queue(store, session, 3)
    mine = store.claim_next(session.id, "host-a:100", "lane0", None, 60)
    other = store.claim_next(session.id, "host-b:100", "lane0", None, 60)
    assert mine and other
    assert store.interrupt_orphans("host-a:100", "daemon restarted") == [mine.id]
    interrupted = store.get_experiment(mine.id)
    assert interrupted is not None
    assert (interrupted.status, interrupted.error) == ("interrupted", "daemon restarted")
    assert interrupted.finished_at is not None
    assert store.get_experiment(other.id).status == "running"  # type: ignore[union-attr]


def test_interrupt_orphans_leaves_a_live_owner_whose_id_extends_the_dead_ones(
        store: Store, session: SessionRecord) -> None:
    """A dead owner `host:12` does not take the work of a live `host:123` with it."""
    _queue(store, session, 2)
    dead = store.claim_next(session.id, "host:12", "lane0", None, 60)
    live = store.claim_next(session.id, "host:123", "lane1", None, 60)
    assert dead and live
    assert store.interrupt_orphans("host:12", "x") == [dead.id]
    assert store.get_experiment(live.id).status == "running"  # type: ignore[union-attr]


def test_interrupt_orphans_rejects_empty_owner(store: Store) -> None:
    """An empty owner is refused."""
    with pytest.raises(StoreError, match="needs an owner"):
        store.interrupt_orphans("", "x")
