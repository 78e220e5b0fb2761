"""TLS and basic auth for the daemon's HTTP endpoint, from a web-config file in the format Prometheus' own
exporters read (github.com/prometheus/exporter-toolkit, docs/web-configuration.md):

    tls_server_config:
      cert_file: server.crt            # relative paths are relative to this file
      key_file: server.key
      # client_auth_type: RequireAndVerifyClientCert
      # client_ca_file: clients-ca.crt
      # min_version: TLS13             # TLS12 (default) or TLS13
    basic_auth_users:
      prometheus: $2y$10$...            # a bcrypt hash: `htpasswd -nBC 10 prometheus`

A lab's central Prometheus then scrapes with `scheme: https`, `tls_config` and `basic_auth`
(deploy/README.md, "Sharing the metrics"). Keys this daemon does not implement are refused, not ignored.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daemon.errors import ConfigError

_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version"}
_CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_HINT = "see deploy/README.md, 'Sharing the metrics' (the exporter-toolkit web-config format)"


@dataclass
class WebConfig:
    """The loaded file: an SSL context (None = plain HTTP) and user -> bcrypt hash (empty = no auth)."""

    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    _verified: set[bytes] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _checking: threading.Lock = field(default_factory=threading.Lock)

    def authorized(self, header: str | None) -> bool:
        """Whether an `Authorization` header carries a configured user and its password (always, without users)."""
        if not self.users:
            return True
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        if hashed is None:
            return False
        # bcrypt is slow on purpose (~0.1 s): remember pairs already checked, as exporter-toolkit does.
        key = hashlib.sha256(user.encode() + b"\0" + password.encode() + b"\0" + hashed).digest()
        with self._lock:
            if any(hmac.compare_digest(key, known) for known in self._verified):
                return True
        import bcrypt

        # One check at a time: a flood of wrong passwords costs one core, not all of them.
        with self._checking:
            if not bcrypt.checkpw(password.encode(), hashed):
                return False
        with self._lock:
            self._verified.add(key)
        return True


def _mapping(value: Any, where: str, path: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {where} must be a mapping", hint=_HINT)
    return value


def _file(base: Path, value: Any, key: str, path: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: tls_server_config.{key} must name a file", hint=_HINT)
    resolved = (base / value) if not Path(value).is_absolute() else Path(value)
    if not resolved.is_file():
        raise ConfigError(f"{path}: tls_server_config.{key} {resolved} does not exist", hint=_HINT)
    return resolved


def _ssl_context(tls: dict[str, Any], path: Path) -> ssl.SSLContext:
    unknown = set(tls) - _TLS_KEYS
    if unknown:
        raise ConfigError(f"{path}: tls_server_config keys not supported here: {', '.join(sorted(unknown))}",
                          hint=_HINT)
    base = path.parent
    cert, key = _file(base, tls.get("cert_file"), "cert_file", path), _file(base, tls.get("key_file"), "key_file", path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    version = tls.get("min_version", "TLS12")
    if version not in _VERSIONS:
        raise ConfigError(f"{path}: tls_server_config.min_version {version!r} is not one of TLS12, TLS13", hint=_HINT)
    context.minimum_version = _VERSIONS[version]
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{path}: cannot load {cert} with {key}: {exc}", hint=_HINT) from None
    auth = tls.get("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH:
        raise ConfigError(f"{path}: client_auth_type {auth!r} is not one of {', '.join(_CLIENT_AUTH)}", hint=_HINT)
    context.verify_mode = _CLIENT_AUTH[auth]
    if auth != "NoClientCert":
        context.load_verify_locations(_file(base, tls.get("client_ca_file"), "client_ca_file", path))
    return context


def _users(users: dict[str, Any], path: Path) -> dict[str, bytes]:
    checked: dict[str, bytes] = {}
    for user, hashed in users.items():
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise ConfigError(f"{path}: basic_auth_users.{user} must be a bcrypt hash ($2y$...), not a password",
                              hint="make one with `htpasswd -nBC 10 USER` or python -c 'import bcrypt; "
                                   "print(bcrypt.hashpw(b\"PASSWORD\", bcrypt.gensalt()).decode())'")
        checked[str(user)] = hashed.encode()
    return checked


def load_web_config(path: Path) -> WebConfig:
    """Read and check the file; any problem is one `ConfigError` line naming the file and the key."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read metrics.web_config_file {path}: {exc.strerror}", hint=_HINT) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}", hint=_HINT) from None
    data = _mapping(data, "the file", path)
    unknown = set(data) - {"tls_server_config", "basic_auth_users"}
    if unknown:
        raise ConfigError(f"{path}: keys not supported here: {', '.join(sorted(unknown))}", hint=_HINT)
    tls = _mapping(data.get("tls_server_config"), "tls_server_config", path)
    return WebConfig(ssl_context=_ssl_context(tls, path) if tls else None,
                     users=_users(_mapping(data.get("basic_auth_users"), "basic_auth_users", path), path))
