"""The store: every experiment, session, noise sample and agent call, in Postgres or SQLite.

`open_store(url)` connects (it runs no migration); `Store.upgrade()` migrates to the packaged head.
"""

from __future__ import annotations

from daemon.store.engine import create_store_engine
from daemon.store.records import (
    ACTIVE_STATUSES,
    KINDS,
    STATUSES,
    TERMINAL_STATUSES,
    AgentCallRecord,
    ExperimentRecord,
    NoiseFloor,
    SessionRecord,
)
from daemon.store.sql import Store

__all__ = [
    "ACTIVE_STATUSES",
    "KINDS",
    "STATUSES",
    "TERMINAL_STATUSES",
    "AgentCallRecord",
    "ExperimentRecord",
    "NoiseFloor",
    "SessionRecord",
    "Store",
    "open_store",
]


def open_store(url: str, *, retry_seconds: float = 120.0, pool_size: int = 5) -> Store:
    """A `Store` on `url` (SQLAlchemy URL; plain postgresql:// uses psycopg 3). Runs no migration."""
    return Store(create_store_engine(url, pool_size=pool_size), retry_seconds=retry_seconds)
