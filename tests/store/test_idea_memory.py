"""The store's part of the idea memory on both backends: the line's fence nonce and the measurement versions."""

from __future__ import annotations

import re
import threading

import sqlalchemy
from alembic import command

from daemon.store import Store, open_store
from daemon.store.migrate import alembic_config
from daemon.store.records import SessionRecord


def test_line_nonce_is_made_once_and_kept(store: Store) -> None:
    """A line's nonce is random hex, the same at every later call, and different for another line."""
    first_line, second_line = store.new_line("a"), store.new_line("b")
    nonce = store.line_nonce(first_line)
    assert re.fullmatch(r"[0-9a-f]{32}", nonce)
    assert store.line_nonce(first_line) == nonce
    assert store.line_nonce(second_line) != nonce


def test_measurement_version_tags_stay_once_written(store: Store, session: SessionRecord) -> None:
    """Tagging only tags experiments without a tag; a later version never overwrites an earlier one."""
    first = store.create_experiment(session.id, "candidate", "a = 1\n", description="a", source_hash="a")
    second = store.create_experiment(session.id, "candidate", "a = 2\n", description="b", source_hash="b")
    store.tag_measurement_version([first.id], 1)
    store.tag_measurement_version([first.id, second.id], 2)
    assert store.measurement_versions([first.id, second.id, 999]) == {first.id: 1, second.id: 2}


def test_concurrent_tagging_of_the_same_experiments_is_not_an_error(store: Store, session: SessionRecord) -> None:
    """Threads tagging the same untagged experiments at once (a lane and a proposer) all succeed, once each."""
    ids = [store.create_experiment(session.id, "candidate", f"a = {i}\n", description=str(i),
                                   source_hash=str(i)).id for i in range(40)]
    errors: list[BaseException] = []
    for round_ids in (ids[i:i + 4] for i in range(0, len(ids), 4)):
        barrier = threading.Barrier(4)

        def tag(ids_now: list[int] = round_ids, start: threading.Barrier = barrier) -> None:
            start.wait()
            try:
                store.tag_measurement_version(ids_now, 2)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=tag) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert store.measurement_versions(ids) == {eid: 2 for eid in ids}


def test_migration_tags_existing_experiments_as_version_1(empty_url: str) -> None:
    """Experiments that exist when 0006_idea_memory runs were measured before this round: version 1."""
    engine = sqlalchemy.create_engine(empty_url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0005_scored_runs")
        conn.execute(sqlalchemy.text(
            "INSERT INTO sessions (request_id, tag, trigger, program_md, program_sha256, config, status, started_at) "
            "VALUES ('r', 't', 'manual', '', '', '{}', 'running', CURRENT_TIMESTAMP)"))
        session_id = conn.execute(sqlalchemy.text("SELECT id FROM sessions")).scalar_one()
        conn.execute(sqlalchemy.text(
            "INSERT INTO experiments (request_id, session_id, kind, attempt, seed, status, description, hypothesis,"
            " diff, source, source_sha256, source_hash, \"commit\", probe, oom, log_tail, error, created_at) VALUES "
            "('e', :sid, 'candidate', 0, 0, 'discarded', '', '', '', '', '', '', '', '', false, '', '',"
            " CURRENT_TIMESTAMP)"), {"sid": session_id})
    engine.dispose()
    store = open_store(empty_url)
    store.upgrade()
    experiment_id = store.list_experiments(limit=10)[0].id
    assert store.measurement_versions([experiment_id]) == {experiment_id: 1}
    store.close()
