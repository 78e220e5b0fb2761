"""When a session of the daemon ends: write its morning report and, optionally, post its summary to a webhook.

Neither may take the daemon down: a failure is logged (warning) and the daemon waits for the next window.
The webhook gets JSON: `{"text": <one paragraph, opening with the re-test's night gain>, "session_id", "status", "stop_reason", "baseline_val_bpb",
"best_val_bpb", "report": <path of report.md on the daemon's host>}` (`text` suits Slack/Mattermost hooks).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from daemon.config import ReportConfig
from daemon.errors import AutoresearchError
from daemon.ops.logs import get_logger

log = get_logger("autoresearch.morning")


def summary_text(summary: Any, report: Path | None, headline: str = "") -> str:
    """The webhook's paragraph; `headline` is the re-test's night gain line (`retest_report.night_headline`)."""
    best, baseline = summary.best_val_bpb, summary.baseline_val_bpb
    if best is not None and baseline is not None:
        result = f"best val_bpb {best:.6f} vs baseline {baseline:.6f} ({best - baseline:+.6f})"
    elif baseline is not None:
        result = f"baseline {baseline:.6f}, no improvement"
    else:
        result = "no baseline measured"
    counts = ", ".join(f"{n} {status}" for status, n in sorted(summary.counts.items())) or "no experiments"
    where = f" Report: {report}" if report is not None else ""
    proof = f"{headline}. " if headline else ""
    return (f"autoresearch session {summary.session_id} ({summary.tag}) {summary.status}: {summary.stop_reason}. "
            f"{proof}{result}; {counts}.{where}")


def post_summary(url: str, payload: dict[str, Any], timeout_s: float) -> None:
    """POST `payload` as JSON; raise AutoresearchError on any failure (the URL itself is never logged)."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            answer.read()
    except urllib.error.HTTPError as exc:
        raise AutoresearchError(f"the report webhook answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise AutoresearchError(f"the report webhook is unreachable ({type(exc).__name__})") from None


def _headline(store: Any, session_id: int) -> str:
    from daemon.ops.retest_report import confidence_of, night_headline
    from daemon.research.retest import comparisons

    try:
        session = store.get_session(session_id)
        confidence = confidence_of(session.config if session is not None else {})
        return night_headline(comparisons(store, [session_id], confidence), confidence)
    except Exception as exc:  # the webhook still goes out, without the re-test's line
        log.warning("re-test headline unavailable", session=session_id, error=str(exc)[:200])
        return ""


def finish_session(store: Any, reports_dir: Path, summary: Any, config: ReportConfig) -> Path | None:
    """Write the session's report (returns report.md's path, or None if that failed) and post the webhook."""
    from daemon.ops.report import write_report

    report: Path | None = None
    try:
        report = write_report(store, summary.session_id, reports_dir)
        log.info("morning report written", session=summary.session_id, report=str(report))
    except Exception as exc:  # a full disk or a broken chart must not stop the daemon
        log.warning("morning report failed", session=summary.session_id, error=f"{type(exc).__name__}: {exc}")
    if config.webhook_url is not None:
        payload = {"text": summary_text(summary, report, _headline(store, summary.session_id)),
                   "session_id": summary.session_id,
                   "status": summary.status, "stop_reason": summary.stop_reason,
                   "baseline_val_bpb": summary.baseline_val_bpb, "best_val_bpb": summary.best_val_bpb,
                   "report": str(report) if report is not None else None}
        try:
            post_summary(config.webhook_url.get_secret_value(), payload, config.webhook_timeout_s)
            log.info("report summary posted", session=summary.session_id)
        except AutoresearchError as exc:
            log.warning("report summary not posted", session=summary.session_id, error=str(exc))
    return report
