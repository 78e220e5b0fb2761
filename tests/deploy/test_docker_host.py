"""DOCKER_HOST: the daemon reaches its engine through whatever it names (a socket proxy, a rootless engine's
socket). Here a TCP proxy relaying to the real engine stands for the proxy; it can refuse paths like a
socket proxy configured without INFO=1."""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.ops.health_metrics import local_docker_root
from sandbox import docker_available

REQUEST_LINE = re.compile(rb"(?:GET|POST|PUT|DELETE|HEAD) \S+ HTTP/1\.[01]")


def _engine_socket() -> str:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://") or not Path(host.removeprefix("unix://")).exists():
        pytest.skip(f"no local Docker engine socket ({host})")
    return host.removeprefix("unix://")


class RelayProxy:
    """Accepts TCP, relays each connection to the engine's Unix socket; answers 403 to denied request paths."""

    def __init__(self, engine: str, denied: tuple[str, ...] = ()) -> None:
        self.engine, self.denied = engine, denied
        self.requests: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        # The SDK keeps connections alive: every request on one is inspected, not only the first.
        with client, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as engine:
            engine.connect(self.engine)
            back = threading.Thread(target=self._pump, args=(engine, client), daemon=True)
            back.start()
            try:
                while data := client.recv(65536):
                    lines = [m.decode() for m in REQUEST_LINE.findall(data)]
                    self.requests.extend(lines)
                    if any(path in line for line in lines for path in self.denied):
                        client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        return
                    engine.sendall(data)
                engine.shutdown(socket.SHUT_WR)
            except OSError:
                return
            back.join(timeout=10)

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._listener.close()


@pytest.fixture()
def proxy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[RelayProxy]:
    relay = RelayProxy(_engine_socket(), denied=getattr(request, "param", ()))
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{relay.port}")
    yield relay
    relay.close()


@pytest.mark.docker
def test_docker_calls_go_through_docker_host(proxy: RelayProxy) -> None:
    """With DOCKER_HOST naming a proxy, the engine check and the image-store lookup both pass through it."""
    assert docker_available()
    root = local_docker_root()
    assert root is not None and root.is_dir()
    assert any("/_ping" in line for line in proxy.requests), proxy.requests
    assert any("/info" in line for line in proxy.requests), proxy.requests


@pytest.mark.docker
@pytest.mark.parametrize("proxy", [("/info",)], indirect=True)
def test_a_proxy_that_refuses_info_leaves_the_image_disk_unwatched_but_docker_usable(proxy: RelayProxy) -> None:
    """A socket proxy without INFO=1: the engine still answers, the image store is simply not watched."""
    assert docker_available()
    assert local_docker_root() is None
    assert any("/info" in line for line in proxy.requests)
