"""TLS and basic auth of the daemon's HTTP endpoint from an exporter-toolkit web-config file, over real HTTPS."""

from __future__ import annotations

import base64
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.errors import ConfigError
from daemon.ops.http import DaemonHTTPServer, Heartbeat, start_http_server
from daemon.ops.metrics import Metrics
from daemon.ops.webconfig import load_web_config
from tests.tlsfiles import bcrypt_hash, web_config


@pytest.fixture()
def tls_server(tmp_path: Path) -> Iterator[DaemonHTTPServer]:
    """The daemon's endpoint with TLS and one user, prometheus / s3cret."""
    heartbeat = Heartbeat(60)
    heartbeat.beat()
    server = start_http_server("127.0.0.1", 0, Metrics().registry, db_ping=lambda: True, heartbeat=heartbeat,
                               status_json=lambda: {"ok": True},
                               web_config=web_config(tmp_path, {"prometheus": "s3cret"}))
    yield server
    server.close()


def _get(url: str, cafile: Path | None, user: str | None = None, password: str = "") -> int:
    request = urllib.request.Request(url)
    if user is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    context = ssl.create_default_context(cafile=str(cafile)) if cafile is not None else None
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_right_credentials_over_tls_get_metrics_and_status(tls_server: DaemonHTTPServer, tmp_path: Path) -> None:
    """With the configured user over verified TLS, /metrics and /status.json answer 200; the URL says https."""
    assert tls_server.url.startswith("https://")
    for path in ("/metrics", "/status.json"):
        assert _get(tls_server.url + path, tmp_path / "server.crt", "prometheus", "s3cret") == 200, path


@pytest.mark.parametrize(("user", "password"), [(None, ""), ("prometheus", "wrong"), ("prometheus", ""),
                                                 ("nobody", "s3cret"), ("prometheus", "s3cret\n"),
                                                 ("PROMETHEUS", "s3cret")])
def test_missing_or_wrong_credentials_get_401_on_every_protected_path(
        tls_server: DaemonHTTPServer, tmp_path: Path, user: str | None, password: str) -> None:
    """No header, a wrong password, an unknown or differently cased user: 401 for /, /metrics, /status.json."""
    for path in ("/", "/metrics", "/status.json", "/nothing"):
        assert _get(tls_server.url + path, tmp_path / "server.crt", user, password) == 401, path


@pytest.mark.parametrize("header", ["Basic", "Basic !!!notbase64", "Bearer abc", "Basic " +
                                    base64.b64encode(b"no-colon").decode(), "Basic " +
                                    base64.b64encode(b"\xff\xfe:x").decode()])
def test_malformed_authorization_headers_get_401(tls_server: DaemonHTTPServer, tmp_path: Path, header: str) -> None:
    """Malformed or foreign Authorization headers are refused, not errors."""
    request = urllib.request.Request(tls_server.url + "/metrics", headers={"Authorization": header})
    context = ssl.create_default_context(cafile=str(tmp_path / "server.crt"))
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10, context=context)
    assert info.value.code == 401


def test_healthz_needs_no_credentials(tls_server: DaemonHTTPServer, tmp_path: Path) -> None:
    """Liveness probes carry no password: /healthz answers without one (still over TLS)."""
    assert _get(tls_server.url + "/healthz", tmp_path / "server.crt") == 200


def test_plain_http_to_the_tls_port_gets_nothing_and_the_server_keeps_serving(
        tls_server: DaemonHTTPServer, tmp_path: Path) -> None:
    """A plain-HTTP client fails the handshake; the next TLS client is served."""
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(tls_server.url.replace("https://", "http://") + "/metrics", timeout=10)
    assert _get(tls_server.url + "/metrics", tmp_path / "server.crt", "prometheus", "s3cret") == 200


def test_auth_without_tls_works_and_plain_config_stays_plain(tmp_path: Path) -> None:
    """basic_auth_users alone: plain HTTP with a password check."""
    heartbeat = Heartbeat(60)
    server = start_http_server("127.0.0.1", 0, Metrics().registry, db_ping=lambda: True, heartbeat=heartbeat,
                               web_config=web_config(tmp_path, {"p": "pw"}, tls=False))
    try:
        assert server.url.startswith("http://")
        assert _get(server.url + "/metrics", None) == 401
        assert _get(server.url + "/metrics", None, "p", "pw") == 200
    finally:
        server.close()


@pytest.mark.parametrize(("text", "message"), [
    ("tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n", "does not exist"),
    ("basic_auth_users:\n  prometheus: s3cret\n", "must be a bcrypt hash"),
    ("basic_auth_users:\n  - prometheus\n", "must be a mapping"),
    ("http_server_config:\n  http2: false\n", "not supported"),
    ("tls_server_config:\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n", "not supported"),
    ("tls_server_config: [1\n", "not valid YAML"),
    ("- a list\n", "must be a mapping"),
])
def test_bad_web_config_is_one_config_error_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    """Missing files, plain passwords, unsupported keys and bad YAML: a ConfigError naming the file."""
    path = tmp_path / "web.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_web_config(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_missing_web_config_file_is_a_config_error(tmp_path: Path) -> None:
    """A web_config_file that does not exist stops start-up with a ConfigError, before binding."""
    with pytest.raises(ConfigError, match="cannot read"):
        start_http_server("127.0.0.1", 0, Metrics().registry, db_ping=lambda: True, heartbeat=Heartbeat(60),
                          web_config=tmp_path / "absent.yml")


@pytest.mark.parametrize("prefix", ["$2a$", "$2b$", "$2y$"])
def test_each_bcrypt_prefix_verifies(tmp_path: Path, prefix: str) -> None:
    """Hashes from htpasswd ($2y$), Python's bcrypt ($2b$) and older tools ($2a$) all check."""
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  u: '{bcrypt_hash('pw', prefix)}'\n")
    config = load_web_config(path)
    assert config.authorized("Basic " + base64.b64encode(b"u:pw").decode())
    assert not config.authorized("Basic " + base64.b64encode(b"u:pW").decode())
