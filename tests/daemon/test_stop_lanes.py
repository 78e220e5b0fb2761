"""Stop conditions (window end, signals, grace) and lane planning."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from daemon.errors import ConfigError
from daemon.research.lanes import Lane, plan_lanes
from daemon.research.stop import StopCondition


class ManualClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_window_end_stops_launching_then_kills_after_grace() -> None:
    """At the window end no new launch; running work is killed only after the grace period."""
    clock = ManualClock()
    stop = StopCondition.for_duration(10, grace_s=5, monotonic=clock)
    assert stop.reason() is None
    clock.now += 10
    assert stop.reason() == "window ended"
    assert not stop.kill_due()
    clock.now += 5
    assert stop.kill_due()


def test_first_signal_finishes_second_kills() -> None:
    """The first SIGTERM waits for the grace period, the second kills at once."""
    clock = ManualClock()
    stop = StopCondition(grace_s=60, monotonic=clock)
    stop.signal("SIGTERM")
    assert stop.reason() is not None and "SIGTERM" in stop.reason()
    assert not stop.kill_due()
    stop.signal("SIGTERM")
    assert stop.kill_due()


def test_signalled_tells_a_signal_from_other_stops() -> None:
    """signalled() is true after a signal only, whatever the stop reasons say."""
    stop = StopCondition(grace_s=60)
    stop.request_stop("SIGNAL-looking reason from elsewhere")
    assert not stop.signalled()
    stop.signal("SIGINT")
    assert stop.signalled()


def test_first_stop_reason_is_kept() -> None:
    """A later reason never overwrites the first (the report says why the night ended)."""
    stop = StopCondition()
    stop.request_stop("cost cap reached")
    stop.request_stop("window ended")
    assert stop.reason() == "cost cap reached"


@dataclass
class Gpu:
    uuid: str


class Probe:
    def __init__(self, uuids: list[str]) -> None:
        self.uuids = uuids

    def gpus(self) -> list[Gpu]:
        return [Gpu(u) for u in self.uuids]


def test_cpu_machine_gets_one_cpu_lane() -> None:
    """Without GPUs there is exactly one CPU lane."""
    assert plan_lanes([], Probe([])) == [Lane("cpu", None)]


def test_one_lane_per_visible_gpu() -> None:
    """Without configured GPUs every GPU the probe sees gets a lane."""
    assert plan_lanes([], Probe(["GPU-a", "GPU-b"])) == [Lane("gpu0", "GPU-a"), Lane("gpu1", "GPU-b")]


def test_configured_gpus_choose_the_lanes() -> None:
    """settings.gpus restricts the lanes to the named UUIDs."""
    assert plan_lanes(["GPU-b"], Probe(["GPU-a", "GPU-b"])) == [Lane("gpu0", "GPU-b")]


def test_unknown_configured_gpu_is_a_config_error() -> None:
    """A UUID the machine does not have is refused with the UUIDs it does have."""
    with pytest.raises(ConfigError, match="does not have"):
        plan_lanes(["GPU-x"], Probe(["GPU-a"]))


def test_duplicate_configured_gpu_is_a_config_error() -> None:
    """A GPU named twice would put two experiments on one GPU: refused."""
    with pytest.raises(ConfigError, match="twice"):
        plan_lanes(["GPU-a", "GPU-a"], Probe(["GPU-a"]))
