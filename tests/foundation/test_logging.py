"""Structured logs: JSON lines off a terminal, readable on one, experiment ids on every related line."""

from __future__ import annotations

import io
import json

from daemon.ops.logs import bind_experiment, configure_logging, get_logger


def test_json_lines_when_not_a_terminal() -> None:
    """Off a terminal every line is a JSON object with event, level and timestamp."""
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    get_logger().info("window opened", lanes=2)
    record = json.loads(stream.getvalue())
    assert record["event"] == "window opened"
    assert record["lanes"] == 2
    assert record["level"] == "info"
    assert "timestamp" in record


def test_experiment_id_is_bound_inside_the_block() -> None:
    """Lines inside bind_experiment carry the id; lines after it do not."""
    stream = io.StringIO()
    configure_logging("info", json=True, stream=stream)
    log = get_logger()
    with bind_experiment(42, lane="gpu0"):
        log.info("train stage started")
    log.info("idle")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["experiment_id"] == 42
    assert first["lane"] == "gpu0"
    assert "experiment_id" not in second


def test_level_filter_drops_debug() -> None:
    """At level info, debug lines are not written."""
    stream = io.StringIO()
    configure_logging("info", json=True, stream=stream)
    get_logger().debug("noise")
    assert stream.getvalue() == ""


def test_console_renderer_on_request() -> None:
    """json=False gives a human-readable line, not JSON."""
    stream = io.StringIO()
    configure_logging("info", json=False, stream=stream)
    get_logger().info("hello", experiment_id=7)
    text = stream.getvalue()
    assert "hello" in text
    assert "experiment_id=7" in text
    assert not text.startswith("{")
