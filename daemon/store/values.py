"""What every query module of the store shares: the UTC timestamp it stamps rows with and its argument checks.

A leaf module (it imports nothing of the store), so that `daemon.store.sql` and the query modules it
composes into `Store` can all use it without importing one another.
"""

from __future__ import annotations

import hashlib
import math
from datetime import datetime, timezone

from daemon.errors import StoreError


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def require_aware(value: datetime, name: str) -> datetime:
    """`value` in UTC; a naive datetime is refused (its zone would be a guess)."""
    if value.tzinfo is None:
        raise StoreError(f"{name} {value.isoformat()} has no time zone",
                         hint="pass a timezone-aware datetime, e.g. datetime.now(timezone.utc)")
    return value.astimezone(timezone.utc)


def require_positive(value: float, name: str) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise StoreError(f"{name} must be a positive number of seconds, got {value!r}")


def sha256(text_value: str) -> str:
    return hashlib.sha256(text_value.encode("utf-8")).hexdigest()
