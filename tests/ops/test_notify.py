"""systemd notify protocol against a real unix datagram socket."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.errors import ConfigError
from daemon.service.notify import SystemdNotifier


@pytest.fixture()
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield path, sock
    sock.close()


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_with_status_is_one_datagram(listener) -> None:
    """READY=1 and STATUS= arrive together in one datagram."""
    path, sock = listener
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier.ready("waiting for 22:00")
    assert receive(sock) == ["READY=1", "STATUS=waiting for 22:00"]


def test_stopping_and_watchdog_messages(listener) -> None:
    """STOPPING=1 and WATCHDOG=1 are sent as their own datagrams."""
    path, sock = listener
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path})
    notifier.stopping()
    notifier.watchdog()
    assert receive(sock) == ["STOPPING=1"]
    assert receive(sock) == ["WATCHDOG=1"]


def test_status_newlines_cannot_inject_fields(listener) -> None:
    """A newline in a status text is flattened so it cannot add a KEY=value field."""
    path, sock = listener
    SystemdNotifier.from_environ({"NOTIFY_SOCKET": path}).status("best 0.99\nREADY=1")
    assert receive(sock) == ["STATUS=best 0.99 READY=1"]


def test_abstract_socket_name() -> None:
    """An '@name' NOTIFY_SOCKET reaches a socket in the abstract namespace."""
    name = f"autoresearch-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(10)
        assert SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@" + name}).ready()
        assert receive(sock) == ["READY=1"]


def test_no_notify_socket_is_a_noop() -> None:
    """Without NOTIFY_SOCKET nothing is sent and no watchdog thread starts."""
    notifier = SystemdNotifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.ready() is False
    pinger = notifier.start_watchdog(alive=lambda: True)
    assert not pinger.running
    pinger.stop()


def test_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    """A socket path with no listener makes notify return False instead of raising."""
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.watchdog() is False


def test_watchdog_interval_is_half_the_deadline() -> None:
    """WATCHDOG_USEC=20 s gives a ping every 10 s."""
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}
    assert SystemdNotifier.from_environ(env).watchdog_interval_s == 10.0


def test_watchdog_for_another_pid_is_ignored() -> None:
    """A WATCHDOG_PID naming another process disables our watchdog pings."""
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}
    assert SystemdNotifier.from_environ(env).watchdog_interval_s is None


def test_watchdog_pinger_pings_while_alive(listener) -> None:
    """The pinger thread sends WATCHDOG=1 when the loop is alive."""
    path, sock = listener
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    pinger = notifier.start_watchdog(alive=lambda: True)
    try:
        assert receive(sock) == ["WATCHDOG=1"]
    finally:
        pinger.stop()
    assert not pinger.running


def test_watchdog_pinger_withholds_pings_when_loop_is_dead(listener) -> None:
    """A dead loop gets no ping, so systemd's watchdog can restart the service."""
    path, sock = listener
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    calls: list[int] = []

    def dead() -> bool:
        calls.append(1)
        if len(calls) >= 3:
            notifier.status("checked")  # a marker datagram once the pinger has decided three times
        return False

    pinger = notifier.start_watchdog(alive=dead)
    try:
        assert receive(sock) == ["STATUS=checked"]
    finally:
        pinger.stop()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NOTIFY_SOCKET": "relative.sock"}, "neither a socket path"),
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "ten"}, "whole number"),
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "0"}, "positive"),
    ],
)
def test_bad_environment_raises_config_error(env: dict[str, str], message: str) -> None:
    """Malformed systemd variables raise ConfigError saying what is wrong and what to do."""
    with pytest.raises(ConfigError, match=message) as info:
        SystemdNotifier.from_environ(env)
    assert "systemd" in info.value.hint
