"""Structured logging: readable on a terminal, JSON lines otherwise (journald, files, pipes).

Lines about an experiment carry `experiment_id` through `bind_experiment`, so `grep` or a log query
on one id shows its whole life. Libraries that log through the standard `logging` module (APScheduler,
Alembic, docker, urllib3) go through the same renderer, so every line has one format. Under systemd
(stderr is the journal: `$JOURNAL_STREAM`) each line starts with its syslog priority, `<3>` for an error
... `<7>` for debug, which journald strips and stores: `journalctl -u autoresearch -p warning` works.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# syslog priorities (sd-daemon(3) prefixes)
PRIORITIES = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7,
              "notset": 7}
# Chatty libraries: below these levels their lines are noise (alembic: "Context impl ..." on every command;
# APScheduler: "Running job ..." every 10 s).
_QUIET = {"urllib3": logging.WARNING, "docker": logging.INFO, "apscheduler": logging.WARNING, "alembic": logging.WARNING}
_HANDLER_NAME = "autoresearch"  # the root handler set up here (replaced, not doubled, on a second set-up)


def stream_is_journal(stream: Any, environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether `stream` is the systemd journal: `$JOURNAL_STREAM` names its device and inode."""
    value = (environ if environ is not None else os.environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return stat.st_dev == int(device) and stat.st_ino == int(inode)


class _PriorityPrefix:
    """Wraps a renderer: `<N>` (the line's syslog priority) in front of the rendered line."""

    def __init__(self, renderer: Any) -> None:
        self.renderer = renderer

    def __call__(self, logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> Any:
        priority = PRIORITIES.get(str(event_dict.get("level", "info")).lower(), 6)
        return f"<{priority}>{self.renderer(logger, name, event_dict)}"


def configure_logging(level: str = "info", json: bool | None = None, stream: Any = None,
                      journal: bool | None = None) -> None:
    """Set up structlog (and the stdlib's root logger) once per process.

    `json=None` chooses by whether `stream` is a terminal; `journal=None` by `$JOURNAL_STREAM`.
    """
    stream = stream if stream is not None else sys.stderr
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())
    if journal is None:
        journal = stream_is_journal(stream)
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    if journal:
        renderer = _PriorityPrefix(renderer)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                           structlog.stdlib.add_logger_name, timestamper],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    handler.set_name(_HANDLER_NAME)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    for name, floor in _QUIET.items():
        logging.getLogger(name).setLevel(max(floor, _LEVELS[level]))


def get_logger(name: str = "autoresearch") -> Any:
    return structlog.get_logger(name)


@contextlib.contextmanager
def bind_experiment(experiment_id: int | str, **extra: Any) -> Iterator[None]:
    """Every log line inside the block carries this experiment's id (and `extra`)."""
    with structlog.contextvars.bound_contextvars(experiment_id=experiment_id, **extra):
        yield
