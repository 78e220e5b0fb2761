"""Structured logging: readable on a terminal, JSON lines otherwise (journald, files, pipes).

Lines about an experiment carry `experiment_id` through `bind_experiment`, so `grep` or a log query
on one id shows its whole life.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str = "info", json: bool | None = None, stream: Any = None) -> None:
    """Set up structlog once per process; `json=None` chooses by whether `stream` is a terminal."""
    stream = stream if stream is not None else sys.stderr
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str = "autoresearch") -> Any:
    return structlog.get_logger(name)


@contextlib.contextmanager
def bind_experiment(experiment_id: int | str, **extra: Any) -> Iterator[None]:
    """Every log line inside the block carries this experiment's id (and `extra`)."""
    with structlog.contextvars.bound_contextvars(experiment_id=experiment_id, **extra):
        yield
