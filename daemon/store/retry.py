"""Retrying database work through transient failures: a dropped connection, a restarting server, a busy SQLite.

Only errors that a later attempt can cure are retried (a missing table or a constraint violation is
not); the wait grows exponentially with full jitter, and after `retry_seconds` the last error is
raised as `StoreError` saying what to check.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError

from daemon.errors import StoreError
from daemon.ops.logs import get_logger

T = TypeVar("T")

_FIRST_WAIT_S = 0.05
_MAX_WAIT_S = 5.0

# SQLSTATE classes that a retry can cure: connection exceptions, operator intervention (shutdown,
# "cannot connect now" while starting up), serialization failures and deadlocks, too many connections.
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "57P", "40001", "40P01", "53300")
_TRANSIENT_SQLITE_MESSAGES = ("database is locked", "database table is locked", "database is busy")


def is_transient(exc: BaseException) -> bool:
    """Whether a database error is worth another attempt."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    original = exc.orig
    sqlstate = getattr(original, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith(_TRANSIENT_SQLSTATE_PREFIXES)
    message = str(original).lower()
    if any(text in message for text in _TRANSIENT_SQLITE_MESSAGES):
        return True
    # psycopg reports client-side connection failures (refused, reset, closed) without a SQLSTATE.
    return type(original).__module__.startswith("psycopg") and type(original).__name__ == "OperationalError"


def call_with_retry(
    operation: Callable[[bool], T],
    *,
    retry_seconds: float,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `operation(retried)` until it succeeds, retrying transient errors for up to `retry_seconds`.

    `retried` is True from the second attempt on, so the operation can first look for the effect of
    an earlier attempt that committed before its connection dropped.
    """
    log = get_logger("autoresearch.store")
    deadline = time.monotonic() + retry_seconds
    wait = _FIRST_WAIT_S
    attempt = 1
    while True:
        try:
            return operation(attempt > 1)
        except DBAPIError as exc:
            if not is_transient(exc):
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
                raise StoreError(
                    f"database unavailable for {retry_seconds:.0f}s during {what}: {reason}",
                    hint="check that the database server runs and database.url is right; "
                    "raise database.retry_seconds to wait longer",
                ) from exc
            pause = min(random.uniform(0, wait), remaining)
            log.warning("database busy or unreachable, retrying", operation=what, attempt=attempt,
                        wait_s=round(pause, 3), error=type(exc.orig).__name__)
            sleep(pause)
            wait = min(wait * 2, _MAX_WAIT_S)
            attempt += 1
