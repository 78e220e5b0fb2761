"""Test helpers: a self-signed certificate for 127.0.0.1 (openssl CLI) and a web-config file using it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def self_signed(folder: Path, name: str = "server") -> tuple[Path, Path]:
    """(certificate, key) for CN/SAN 127.0.0.1, valid one day; the certificate is its own CA file."""
    if shutil.which("openssl") is None:
        pytest.fail("no openssl binary: apt-get install openssl")
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=120)
    return cert, key


def bcrypt_hash(password: str, prefix: str = "$2b$") -> str:
    """A bcrypt hash (cost 4: fast in tests) with the given prefix ($2y$ is what htpasswd writes)."""
    import bcrypt

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return prefix + hashed[4:]


def web_config(folder: Path, users: dict[str, str], tls: bool = True) -> Path:
    """A web-config file in folder: TLS with relative cert/key paths (when `tls`) and these user: password pairs."""
    lines = []
    if tls:
        self_signed(folder)
        lines += ["tls_server_config:", "  cert_file: server.crt", "  key_file: server.key"]
    if users:
        lines.append("basic_auth_users:")
        lines += [f"  {user}: {bcrypt_hash(password, '$2y$')}" for user, password in users.items()]
    path = folder / "web.yml"
    path.write_text("\n".join(lines) + "\n")
    return path
