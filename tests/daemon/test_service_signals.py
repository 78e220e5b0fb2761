"""The daemon's signal handler (`daemon.service.serve.Service.on_signal`) takes no lock that the code it interrupts
may hold: a signal that lands inside a lock the old handler needed used to hang the daemon for good."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from daemon.service.runtime import Runtime, open_runtime
from daemon.service.serve import Service

pytestmark = [pytest.mark.postgres]


@pytest.fixture()
def service(tiny_settings: Any) -> Iterator[tuple[Service, Runtime]]:
    runtime = open_runtime(tiny_settings(), daemon=False)  # no windows: the daemon idles until a signal
    service = Service(runtime)
    try:
        yield service, runtime
    finally:
        service.shutdown.set()
        service.close()
        runtime.close()


def _serving(service: Service) -> threading.Thread:
    daemon = threading.Thread(target=service.serve, name="daemon", daemon=True)
    daemon.start()
    deadline = time.monotonic() + 60
    while service.runtime.heartbeat.age() is None:  # the loop has beaten: it waits for triggers
        assert daemon.is_alive() and time.monotonic() < deadline, "the daemon did not start"
        time.sleep(0.05)
    return daemon


def test_a_signal_inside_the_trigger_queues_lock_returns_and_stops_the_daemon(
        service: tuple[Service, Runtime]) -> None:
    """A SIGTERM handled while its thread holds the trigger queue's mutex (where a second SIGTERM caught the
    first one's put) returns at once, and the daemon still stops."""
    daemon_service, _ = service
    daemon = _serving(daemon_service)
    returned = threading.Event()

    def interrupted_inside_the_lock() -> None:
        with daemon_service.triggers.mutex:  # what the interrupted code held
            daemon_service.on_signal(signal.SIGTERM, None)
            daemon_service.on_signal(signal.SIGTERM, None)  # the second signal, as in the hang
            returned.set()

    handler = threading.Thread(target=interrupted_inside_the_lock, daemon=True)
    handler.start()
    handler.join(timeout=10)
    assert returned.is_set(), "the signal handler blocked on a lock its own thread held"
    daemon.join(timeout=60)
    assert not daemon.is_alive(), "the daemon did not stop after SIGTERM"
    assert daemon_service.shutdown.is_set()


def test_signals_before_serving_are_handled_once_it_serves(service: tuple[Service, Runtime]) -> None:
    """A SIGTERM that arrives between start-up and the loop is not lost: the daemon stops as soon as it serves."""
    daemon_service, _ = service
    daemon_service.on_signal(signal.SIGINT, None)
    daemon = threading.Thread(target=daemon_service.serve, name="daemon", daemon=True)
    daemon.start()
    daemon.join(timeout=60)
    assert not daemon.is_alive() and daemon_service.shutdown.is_set()


def test_a_signal_after_close_is_ignored(service: tuple[Service, Runtime]) -> None:
    """Once the pipe is closed (the handlers are restored by then), a late signal neither raises nor writes."""
    daemon_service, _ = service
    daemon_service.close()
    daemon_service.on_signal(signal.SIGTERM, None)
    assert not daemon_service.shutdown.is_set()
