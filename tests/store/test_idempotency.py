"""Writes retried after a commit whose answer was lost: nothing is written twice, nothing is refused wrongly.

A small TCP proxy sits between the store and the real Postgres; when armed it lets the server's
COMMIT through but cuts the connection before the client hears the answer, exactly what a network
drop or server crash at the wrong moment does.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy

from daemon.store import Store, open_store

pytestmark = pytest.mark.postgres

# The wire-protocol message CommandComplete("COMMIT"): 'C', int32 length 11, "COMMIT\0".
COMMIT_COMPLETE = b"C\x00\x00\x00\x0bCOMMIT\x00"


class CommitDroppingProxy:
    """Forwards TCP to Postgres; when `armed`, drops the connection that carries the next COMMIT answer."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.armed = threading.Event()
        self.drops = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_server: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_server and self.armed.is_set() and COMMIT_COMPLETE in data:
                    self.armed.clear()
                    self.drops += 1
                    break
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._listener.close()


@pytest.fixture()
def proxied_store(migrated_postgres_url: str, postgres_cleaner: sqlalchemy.Engine) -> Iterator[tuple[Store, CommitDroppingProxy]]:
    with postgres_cleaner.begin() as conn:
        for table in ("agent_calls", "noise", "experiments", "sessions"):
            conn.execute(sqlalchemy.text(f"DELETE FROM {table}"))
    url = sqlalchemy.make_url(migrated_postgres_url)
    proxy = CommitDroppingProxy(url.port or 5432)
    # sslmode=disable: the proxy must see the protocol in clear text
    proxied = url.set(port=proxy.port, query={"sslmode": "disable"})
    store = open_store(proxied.render_as_string(hide_password=False), retry_seconds=30)
    yield store, proxy
    assert store.engine.pool.checkedout() == 0
    store.close()
    proxy.close()


def _count(url: str, table: str) -> int:
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:
        count = conn.execute(sqlalchemy.text(f"SELECT count(*) FROM {table}")).scalar_one()
    engine.dispose()
    return int(count)


def test_create_with_lost_commit_answer_inserts_once(
        proxied_store: tuple[Store, CommitDroppingProxy], migrated_postgres_url: str) -> None:
    """A create whose COMMIT answer is lost is retried, finds its own row and does not insert it again."""
    store, proxy = proxied_store
    session = store.create_session("t", "manual", "p", {})
    proxy.armed.set()
    created = store.create_experiment(session.id, "candidate", "x = 1\n")
    assert proxy.drops == 1
    assert store.list_experiments(session.id) == [created]
    assert _count(migrated_postgres_url, "experiments") == 1


def test_transition_with_lost_commit_answer_succeeds(
        proxied_store: tuple[Store, CommitDroppingProxy]) -> None:
    """A transition whose COMMIT answer is lost is recognised as done on retry instead of raising."""
    store, proxy = proxied_store
    session = store.create_session("t", "manual", "p", {})
    store.create_experiment(session.id, "candidate", "x = 1\n")
    claimed = store.claim_next(session.id, "host-a:1", "lane0", None, 60)
    assert claimed is not None
    proxy.armed.set()
    moved = store.transition(claimed.id, "running", "crashed", error="boom")
    assert proxy.drops == 1
    assert (moved.status, moved.error) == ("crashed", "boom")


def test_claim_with_lost_commit_answer_returns_the_claim(
        proxied_store: tuple[Store, CommitDroppingProxy]) -> None:
    """A claim whose COMMIT answer is lost returns the experiment it took, not the next one."""
    store, proxy = proxied_store
    session = store.create_session("t", "manual", "p", {})
    first = store.create_experiment(session.id, "candidate", "x = 1\n")
    second = store.create_experiment(session.id, "candidate", "x = 2\n")
    proxy.armed.set()
    claimed = store.claim_next(session.id, "host-a:1", "lane0", None, 60)
    assert proxy.drops == 1
    assert claimed is not None and claimed.id == first.id
    assert store.get_experiment(second.id).status == "queued"  # type: ignore[union-attr]
