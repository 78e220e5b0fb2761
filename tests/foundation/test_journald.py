"""Journal priorities per level and the standard library's loggers (APScheduler, Alembic, docker) through the
same structured renderer."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

from daemon.ops.logs import configure_logging, get_logger, stream_is_journal


def test_journal_lines_carry_their_syslog_priority() -> None:
    """Under journald each line starts with <N>: 7 debug, 6 info, 4 warning, 3 error."""
    stream = io.StringIO()
    configure_logging("debug", json=True, stream=stream, journal=True)
    log = get_logger()
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    lines = stream.getvalue().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>"]
    assert json.loads(lines[2][3:])["event"] == "w"


def test_no_prefix_off_the_journal() -> None:
    """A plain pipe or file gets bare JSON lines (no <N>)."""
    stream = io.StringIO()
    configure_logging("info", json=True, stream=stream, journal=False)
    get_logger().warning("w")
    assert stream.getvalue().startswith("{")


def test_journal_stream_is_recognised_by_device_and_inode(tmp_path: Path) -> None:
    """$JOURNAL_STREAM matching the stream's device:inode means journald; another file does not."""
    path = tmp_path / "journal"
    with path.open("w") as handle:
        stat = os.fstat(handle.fileno())
        assert stream_is_journal(handle, {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"})
        assert not stream_is_journal(handle, {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino + 1}"})
        assert not stream_is_journal(handle, {"JOURNAL_STREAM": "garbage"})
        assert not stream_is_journal(handle, {})
    assert not stream_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def test_stdlib_loggers_go_through_the_structured_renderer() -> None:
    """An APScheduler or Alembic log line comes out as the same JSON, with its logger name and priority;
    Alembic's per-command info chatter and urllib3's debug lines are dropped."""
    stream = io.StringIO()
    configure_logging("info", json=True, stream=stream, journal=True)
    logging.getLogger("apscheduler.scheduler").warning("Run time of job %s was missed", "window")
    logging.getLogger("alembic.runtime.migration").error("Can't locate revision 0009")
    logging.getLogger("alembic.runtime.migration").info("Context impl SQLiteImpl.")
    logging.getLogger("urllib3.connectionpool").debug("chatty")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    first = json.loads(lines[0][3:])
    assert lines[0].startswith("<4>")
    assert first["event"] == "Run time of job window was missed" and first["logger"] == "apscheduler.scheduler"
    assert first["level"] == "warning"
    assert lines[1].startswith("<3>") and json.loads(lines[1][3:])["logger"] == "alembic.runtime.migration"


def test_configuring_twice_keeps_one_handler() -> None:
    """Re-configuring (tests, `once` after `run`) replaces our root handler instead of doubling lines."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", json=True, stream=first)
    configure_logging("info", json=True, stream=second)
    logging.getLogger("docker.api").warning("once")
    assert first.getvalue() == "" and len(second.getvalue().splitlines()) == 1
