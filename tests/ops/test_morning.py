"""The daemon's end of a session: the morning report is written, and its summary posted to a webhook."""

from __future__ import annotations

import io
import json
import queue
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from daemon.config import ReportConfig, load_settings
from daemon.errors import ConfigError
from daemon.ops.logs import configure_logging
from daemon.ops.morning import finish_session, summary_text
from daemon.research import SessionSummary
from tests.ops.conftest import FilledSession
from tests.pgcluster import free_port


@pytest.fixture()
def receiver() -> Iterator[tuple[str, queue.Queue[dict[str, Any]]]]:
    """A local webhook receiver: (its URL, the JSON bodies it got)."""
    got: queue.Queue[dict[str, Any]] = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.put(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook?token=t0ken", got
    server.shutdown()
    server.server_close()


def _summary(filled: FilledSession) -> SessionSummary:
    return SessionSummary(filled.session_id, "nov04", "window closed", "completed", {"kept": 3, "crashed": 1},
                          1.2, 1.165)


def test_session_end_writes_the_report_and_posts_its_summary(
        filled_session: FilledSession, tmp_path: Path, receiver: tuple[str, queue.Queue[dict[str, Any]]]) -> None:
    """report.md lands in reports/session-<id>/ and the webhook gets the summary with its path."""
    url, got = receiver
    report = finish_session(filled_session.store, tmp_path / "reports", _summary(filled_session),
                            ReportConfig(webhook_url=url))
    assert report == tmp_path / "reports" / f"session-{filled_session.session_id}" / "report.md"
    assert report.is_file()
    body = got.get(timeout=10)
    assert body["session_id"] == filled_session.session_id and body["report"] == str(report)
    assert "best val_bpb 1.165000 vs baseline 1.200000 (-0.035000)" in body["text"]


def test_unreachable_webhook_is_logged_not_raised(filled_session: FilledSession, tmp_path: Path) -> None:
    """A webhook that does not answer costs a warning; the report is still written; the URL is not logged."""
    logged = io.StringIO()
    configure_logging("debug", json=True, stream=logged)
    url = f"http://127.0.0.1:{free_port()}/hook?token=s3cret"
    report = finish_session(filled_session.store, tmp_path / "reports", _summary(filled_session),
                            ReportConfig(webhook_url=url, webhook_timeout_s=2))
    assert report is not None and report.is_file()
    assert "report summary not posted" in logged.getvalue()
    assert "s3cret" not in logged.getvalue()


def test_report_failure_does_not_stop_the_webhook(filled_session: FilledSession, tmp_path: Path,
                                                  receiver: tuple[str, queue.Queue[dict[str, Any]]]) -> None:
    """An unwritable report folder: no report, but the summary is still posted (with report null)."""
    url, got = receiver
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert finish_session(filled_session.store, blocker, _summary(filled_session),
                          ReportConfig(webhook_url=url)) is None
    assert got.get(timeout=10)["report"] is None


def test_summary_text_without_a_baseline() -> None:
    """A session that measured nothing says so."""
    text = summary_text(SessionSummary(3, "t", "no data", "failed", {}, None, None), None)
    assert "no baseline measured" in text and "no experiments" in text


def test_webhook_url_file_and_bad_urls(tmp_path: Path) -> None:
    """webhook_url_file is read (a secret); a non-http URL or both forms at once are config errors."""
    secret = tmp_path / "hook"
    secret.write_text("https://chat.example.org/hooks/abc\n")
    settings = load_settings(None, report={"webhook_url_file": str(secret)})
    assert settings.report.webhook_url is not None
    assert settings.report.webhook_url.get_secret_value() == "https://chat.example.org/hooks/abc"
    assert "hooks/abc" not in json.dumps(settings.public_snapshot())
    with pytest.raises(ConfigError, match="http:// or https://"):
        load_settings(None, report={"webhook_url": "file:///etc/passwd"})
    with pytest.raises(ConfigError, match="not both"):
        load_settings(None, report={"webhook_url": "https://x", "webhook_url_file": str(secret)})
