"""The replay guard's memory in the store (`scored_runs`): it outlives the guard, the store and the daemon process."""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy
from alembic import command

from daemon.errors import StoreError
from daemon.research.replay import StoredReplayGuard
from daemon.store import Store, open_store
from daemon.store.migrate import alembic_config, head_revision, schema_state
from daemon.store.records import SessionRecord

SOURCE = "import torch\ntorch.manual_seed(1234)  # ignores AUTORESEARCH_SEED\n"
CHECKPOINT = hashlib.sha256(b"the same archive every time").hexdigest()
OTHER_CHECKPOINT = hashlib.sha256(b"another archive").hexdigest()
VAL_BPB = 1.2345678901234567  # all 17 significant digits must survive the round trip


@pytest.fixture()
def restart(store_url: str) -> Iterator[Callable[[], StoredReplayGuard]]:
    """Builds a fresh store and guard on the same database, as a restarted daemon does; closes them all."""
    opened: list[Store] = []

    def fresh() -> StoredReplayGuard:
        store = open_store(store_url, retry_seconds=5)
        opened.append(store)
        return StoredReplayGuard(store)

    yield fresh
    for store in opened:
        store.close()


def _before_restart(store_url: str, seed: int) -> None:
    """A scored run checked by one daemon process's guard, whose store is then closed."""
    store = open_store(store_url, retry_seconds=5)
    try:
        assert StoredReplayGuard(store).check(SOURCE, seed, CHECKPOINT, VAL_BPB) == ""
    finally:
        store.close()


def test_same_checkpoint_under_another_seed_is_a_replay_after_a_restart(
        store_url: str, restart: Callable[[], StoredReplayGuard]) -> None:
    """A byte-identical checkpoint under seed 2 after a restart is refused against seed 1's run."""
    _before_restart(store_url, seed=1)
    reason = restart().check(SOURCE, 2, CHECKPOINT, VAL_BPB - 0.01)
    assert "byte-identical" in reason and "seed 1" in reason and "AUTORESEARCH_SEED" in reason


def test_same_val_bpb_under_another_seed_is_a_replay_after_a_restart(
        store_url: str, restart: Callable[[], StoredReplayGuard]) -> None:
    """An exactly equal val_bpb (other checkpoint bytes) under another seed is refused after a restart."""
    _before_restart(store_url, seed=1)
    reason = restart().check(SOURCE, 7, OTHER_CHECKPOINT, VAL_BPB)
    assert "bit-identical" in reason and repr(VAL_BPB) in reason


def test_one_ulp_apart_is_not_a_replay(store_url: str, restart: Callable[[], StoredReplayGuard]) -> None:
    """val_bpb is compared exactly: the next float up under another seed is an honest run."""
    _before_restart(store_url, seed=1)
    assert restart().check(SOURCE, 2, OTHER_CHECKPOINT, math.nextafter(VAL_BPB, 2.0)) == ""


def test_same_seed_rerun_is_not_a_replay_after_a_restart(
        store_url: str, restart: Callable[[], StoredReplayGuard]) -> None:
    """A retry or re-measurement under the same seed may give the identical result."""
    _before_restart(store_url, seed=3)
    assert restart().check(SOURCE, 3, CHECKPOINT, VAL_BPB) == ""


def test_another_source_is_not_a_replay(
        store_url: str, restart: Callable[[], StoredReplayGuard]) -> None:
    """Another source with the same checkpoint and val_bpb under another seed passes."""
    _before_restart(store_url, seed=1)
    assert restart().check(SOURCE + "# changed\n", 2, CHECKPOINT, VAL_BPB) == ""


def test_replay_names_the_earlier_experiment(store: Store, session: SessionRecord) -> None:
    """The refusal names the experiment whose run it replays."""
    first = store.create_experiment(session.id, "baseline", SOURCE, seed=0)
    guard = StoredReplayGuard(store)
    assert guard.check(SOURCE, 0, CHECKPOINT, VAL_BPB, experiment_id=first.id) == ""
    assert f"seed 0 (experiment #{first.id})" in guard.check(SOURCE, 1, CHECKPOINT, 1.5)


def test_a_replay_is_not_remembered(store: Store) -> None:
    """A refused run is not recorded: its seed does not become one the next run is compared against."""
    guard = StoredReplayGuard(store)
    guard.check(SOURCE, 1, CHECKPOINT, VAL_BPB)
    assert guard.check(SOURCE, 2, OTHER_CHECKPOINT, VAL_BPB) != ""
    assert guard.check(SOURCE, 3, OTHER_CHECKPOINT, 2.0) == ""  # seed 2's refused checkpoint was not kept


def test_a_checkpoint_value_that_is_no_sha256_is_compared_by_its_hash(store: Store) -> None:
    """An odd checkpoint_sha256 from result.json (too long, not hex) is stored as its hash, and still matches."""
    odd = "x" * 500
    guard = StoredReplayGuard(store)
    assert guard.check(SOURCE, 1, odd, 2.0) == ""
    assert "byte-identical" in guard.check(SOURCE, 2, odd, 2.1)


def test_bad_scored_run_is_refused(store: Store) -> None:
    """A source hash that is no SHA-256, or a non-finite val_bpb, raises StoreError and stores nothing."""
    with pytest.raises(StoreError, match="not a lowercase hex SHA-256"):
        store.record_scored_run("abc", 1, CHECKPOINT, 2.0)
    with pytest.raises(StoreError, match="finite"):
        store.record_scored_run(CHECKPOINT, 1, CHECKPOINT, math.nan)


def test_concurrent_seed_blind_runs_record_exactly_one(store_url: str) -> None:
    """Lanes finishing one seed-blind source at once: one run is recorded, every other is a replay."""
    stores = [open_store(store_url, retry_seconds=30) for _ in range(6)]
    guards = [StoredReplayGuard(opened) for opened in stores]
    try:
        with ThreadPoolExecutor(len(guards)) as pool:
            for attempt in range(5):  # a few rounds, each a new source: a race missed once is likely caught
                start = threading.Barrier(len(guards))
                source = f"{SOURCE}# round {attempt}\n"

                def finish(seed: int, source: str = source, start: threading.Barrier = start) -> str:
                    start.wait()
                    return guards[seed].check(source, seed, CHECKPOINT, VAL_BPB)

                reasons = list(pool.map(finish, range(len(guards))))
                assert sum(reason == "" for reason in reasons) == 1, (attempt, reasons)
    finally:
        for opened in stores:
            opened.close()


def test_upgrade_from_0004_keeps_rows_and_guards_them(empty_url: str) -> None:
    """A database at 0004 with sessions and experiments upgrades to head; old rows stay and can be referenced."""
    engine = sqlalchemy.create_engine(empty_url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0004_sandbox_jobs")
    engine.dispose()
    store = open_store(empty_url, retry_seconds=5)
    try:
        session = store.create_session("night-0", "manual", "# program\n", {})
        old = store.create_experiment(session.id, "baseline", SOURCE, seed=0)
        store.upgrade()
        assert schema_state(empty_url) == (head_revision(), head_revision())
        assert store.get_experiment(old.id) == old and store.get_session(session.id) == session
        guard = StoredReplayGuard(store)
        assert guard.check(SOURCE, 0, CHECKPOINT, VAL_BPB, experiment_id=old.id) == ""
        assert f"experiment #{old.id}" in guard.check(SOURCE, 1, CHECKPOINT, VAL_BPB)
    finally:
        store.close()
