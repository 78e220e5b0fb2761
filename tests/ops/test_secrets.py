"""Secrets stay secret: the database URL and its password come from files and never reach the DB or the logs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import sqlalchemy

from daemon.config import load_settings, public_url
from daemon.errors import ConfigError
from daemon.research.workspace import Workspace
from tests.e2e.support import empty_database

PASSWORD = "s3cret-Pa55-word"


def test_password_file_is_put_into_the_url(tmp_path: Path) -> None:
    """database.password_file completes a URL given without a password."""
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\n")
    settings = load_settings(None, database={"url": "postgresql+psycopg://ar@db:5432/ar", "password_file": secret})
    assert sqlalchemy.make_url(settings.database_url).password == PASSWORD


def test_url_file_is_read(tmp_path: Path) -> None:
    """database.url_file holds the whole URL."""
    secret = tmp_path / "url"
    secret.write_text(f"postgresql+psycopg://ar:{PASSWORD}@db/ar\n")
    assert load_settings(None, database={"url_file": secret}).database_url.endswith(f"ar:{PASSWORD}@db/ar")


def test_url_file_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AUTORESEARCH_DATABASE__URL_FILE is the `*_FILE` form for systemd credentials and Docker secrets."""
    secret = tmp_path / "url"
    secret.write_text(f"postgresql+psycopg://ar:{PASSWORD}@db/ar\n")
    monkeypatch.setenv("AUTORESEARCH_DATABASE__URL_FILE", str(secret))
    assert PASSWORD in load_settings(None).database_url


@pytest.mark.parametrize(("database", "message"), [
    ({"url": "sqlite:///x.db", "url_file": "MISSING"}, "not both"),
    ({"url_file": "MISSING"}, "cannot be read"),
    ({"url_file": "EMPTY"}, "is empty"),
    ({"password_file": "PW"}, "needs database.url"),
    ({"url": f"postgresql://ar:{PASSWORD}@db/ar", "password_file": "PW"}, "already has a password"),
    ({"url": "not a url", "password_file": "PW"}, "not a database URL"),
])
def test_bad_secret_settings_fail_loudly(tmp_path: Path, database: dict[str, str], message: str) -> None:
    """Each inconsistent or unreadable secret setting is a ConfigError naming the problem, not a secret."""
    (tmp_path / "EMPTY").write_text("\n")
    (tmp_path / "PW").write_text(PASSWORD)
    resolved = {k: (str(tmp_path / v) if k.endswith("_file") else v) for k, v in database.items()}
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(None, database=resolved)
    assert PASSWORD not in str(caught.value)


def test_snapshot_masks_the_password_and_drops_the_files(tmp_path: Path) -> None:
    """public_snapshot: the URL with *** for its password, no file paths, no API key."""
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD)
    settings = load_settings(None, database={"url": "postgresql+psycopg://ar@db/ar", "password_file": secret},
                             agent={"api_key": "sk-ant-secret-key"})
    text = json.dumps(settings.public_snapshot())
    assert PASSWORD not in text and "sk-ant-secret-key" not in text and str(secret) not in text
    assert settings.public_snapshot()["database"]["url"] == "postgresql+psycopg://ar:***@db/ar"


def test_public_url_hides_an_unparseable_url() -> None:
    """A URL that does not parse is hidden whole (it might be a password pasted in the wrong place)."""
    assert public_url(PASSWORD) == "(unparseable database URL hidden)"


@pytest.mark.postgres
@pytest.mark.slow
def test_a_session_stores_and_logs_no_password(tmp_path: Path, baseline_source: str, postgres_url: str,
                                               prepared_data: Path, run_cli) -> None:
    """`once` on Postgres with the password in a secret file: not in sessions.config, stdout or stderr."""
    url = sqlalchemy.make_url(empty_database(postgres_url))
    secret = tmp_path / "pg_password"
    secret.write_text(PASSWORD)  # the suite's cluster trusts local connections: any password is accepted
    workspace = Workspace.init(tmp_path / "ws", baseline_source=baseline_source)
    env = {"AUTORESEARCH_DATABASE__URL": url.render_as_string(hide_password=False),
           "AUTORESEARCH_DATABASE__PASSWORD_FILE": str(secret), "AUTORESEARCH_DATA__DIR": str(prepared_data),
           "AUTORESEARCH_WORKSPACE": str(workspace.root), "AUTORESEARCH_JUDGE__NOISE_RUNS": "0",
           "AUTORESEARCH_METRICS__PORT": "0", "AUTORESEARCH_SANDBOX__BACKEND": "local",
           "AUTORESEARCH_TRAINING__PRESET": "tiny", "AUTORESEARCH_TRAINING__TIME_BUDGET_S": "2",
           "AUTORESEARCH_TRAINING__EVAL_TOKENS": "2048", "AUTORESEARCH_TRAINING__PROBE_FLOOR": "false",
           "AUTORESEARCH_AGENT__PROVIDER": "offline",
           "AUTORESEARCH_LOG_LEVEL": "debug", "PATH": os.environ["PATH"]}
    done = run_cli("--log-json", "once", "-n", "0", env=env, cwd=workspace.root)
    assert done.returncode == 0, done.stderr[-2000:]
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:
        configs = [json.dumps(row[0]) for row in conn.execute(sqlalchemy.text("SELECT config FROM sessions"))]
    engine.dispose()
    assert configs, "the session was not recorded"
    assert all(PASSWORD not in config and "***" in config for config in configs)
    assert PASSWORD not in done.stdout and PASSWORD not in done.stderr
    assert PASSWORD not in "".join(p.read_text(errors="replace") for p in workspace.root.rglob("*.log"))
