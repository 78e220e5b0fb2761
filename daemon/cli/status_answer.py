"""What `autoresearch status` accepts from a daemon's `/status.json`: a schema, checked before any use.

Anything that answers on the address is a stranger until its answer has this shape (a web server that says
200 on `/healthz` is not the daemon); a daemon of another version with extra fields still passes. Text is
shown on a terminal, so control characters are replaced before printing.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from daemon.errors import UsageError


class _Part(BaseModel):
    # strict: the raw answer is used as it came (for --json too), so every checked field has its exact type
    model_config = ConfigDict(extra="ignore", strict=True)


class DaemonInfo(_Part):
    instance: str
    owner: str
    version: str


class WindowInfo(_Part):
    name: str | None = None
    start: str
    end: str


class LaneRow(_Part):
    lane: str
    gpu_uuid: str | None = None
    gpu_index: int | None = None
    state: str
    experiment_id: int | None = None
    description: str = ""
    reason: str = ""


class ExperimentRow(_Part):
    id: int
    kind: str = ""
    lane: str | None = None
    description: str = ""
    val_bpb: float | None = None


class SessionInfo(_Part):
    id: int
    tag: str
    trigger: str
    status: str
    started_at: str | None = None


class Cost(_Part):
    usd: float
    cap_usd: float


class Tonight(_Part):
    meaning: str


class StatusAnswer(_Part):
    daemon: DaemonInfo
    window: WindowInfo | None = None
    next_window: WindowInfo | None = None
    lanes: list[LaneRow] = []
    session: SessionInfo | None = None
    best: ExperimentRow | None = None
    baseline: ExperimentRow | None = None
    running: list[ExperimentRow] = []
    cost: Cost | None = None
    tonight: Tonight | None = None


def parse_status(raw: object) -> tuple[dict[str, Any] | None, str]:
    """(the answer as plain data, "") when `raw` has the daemon's shape, else (None, what is wrong)."""
    try:
        StatusAnswer.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the answer"
        return None, f"not an autoresearch daemon's status ({where}: {first['msg']})"
    assert isinstance(raw, dict)  # a StatusAnswer validated
    return raw, ""


def daemon_base_url(given: str) -> str:
    """A `--url` as the base address to ask: http(s), a host, an optional port, no query; a bare host:port
    means http. Anything else is a usage error that says what a good one looks like."""
    text = given.strip()
    if not text:
        raise UsageError("--url is empty", hint="e.g. --url http://127.0.0.1:9464")
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"--url {given!r} is not a URL ({exc})", hint="e.g. --url http://127.0.0.1:9464") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url {given!r} is not an http(s) address with a host",
                         hint="e.g. --url http://127.0.0.1:9464") from None
    if parts.query or parts.fragment or any(ch.isspace() or not ch.isprintable() for ch in text):
        raise UsageError(f"--url {given!r} has a query, a fragment or odd characters",
                         hint="give only the daemon's address, e.g. --url http://127.0.0.1:9464")
    netloc = parts.netloc.rsplit("@", 1)[-1]
    del port  # validated above (a port outside 0..65535 raises)
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def printable(text: str) -> str:
    """`text` with control characters (escape sequences included) shown as '?', newlines kept."""
    return "".join(ch if ch == "\n" or ch.isprintable() else "?" for ch in text)
