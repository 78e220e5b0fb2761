"""Metrics that mean something from the first scrape: unknown values are absent (not 0), lanes are tied to
their GPU, and the process' own health is exported."""

from __future__ import annotations

import os

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from daemon.ops.metrics import Metrics


def _samples(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def test_best_baseline_and_noise_are_absent_until_known() -> None:
    """A fresh daemon exports no best/baseline/noise sample at all (a 0 would look like a real val_bpb)."""
    found = _samples(Metrics())
    for name in ("autoresearch_best_val_bpb", "autoresearch_baseline_val_bpb", "autoresearch_noise_std_bpb",
                 "autoresearch_step_spread_ratio"):
        assert name not in found, name


def test_best_baseline_and_noise_appear_once_measured() -> None:
    """After the baseline and a best are known, each gauge has exactly its value."""
    metrics = Metrics()
    metrics.baseline(1.25)
    metrics.best(1.2)
    metrics.noise_std(0.001)
    metrics.step_spread(1.05)
    found = _samples(metrics)
    assert found["autoresearch_step_spread_ratio"] == [({}, 1.05)]
    assert found["autoresearch_baseline_val_bpb"] == [({}, 1.25)]
    assert found["autoresearch_best_val_bpb"] == [({}, 1.2)]
    assert found["autoresearch_noise_std_bpb"] == [({}, 0.001)]


def test_lane_info_names_the_gpu_by_uuid_and_index() -> None:
    """autoresearch_lane_info ties each lane to its GPU; a CPU lane says `none`."""
    metrics = Metrics()
    metrics.lane_info("gpu0", "GPU-aaaa", 0)
    metrics.lane_info("gpu1", "GPU-bbbb", 3)
    metrics.lane_info("cpu", None, None)
    found = sorted(_samples(metrics)["autoresearch_lane_info"], key=lambda s: s[0]["lane"])
    assert found == [({"lane": "cpu", "gpu_uuid": "none", "gpu_index": "none"}, 1.0),
                     ({"lane": "gpu0", "gpu_uuid": "GPU-aaaa", "gpu_index": "0"}, 1.0),
                     ({"lane": "gpu1", "gpu_uuid": "GPU-bbbb", "gpu_index": "3"}, 1.0)]


def test_process_collector_exports_this_process() -> None:
    """process_* metrics describe the daemon's own process (resident memory, CPU, open fds)."""
    found = _samples(Metrics())
    assert found["process_resident_memory_bytes"][0][1] > 0
    assert "process_cpu_seconds_total" in found
    assert found["process_open_fds"][0][1] >= 3
    assert len(os.listdir("/proc/self/fd")) > 0


def test_retest_gauges_are_absent_until_a_retest_then_hold_its_numbers() -> None:
    """The re-test's gain and held share are not exported as 0 before a re-test, then carry its values."""
    metrics = Metrics()
    found = _samples(metrics)
    assert "autoresearch_retest_gain_bpb" not in found and "autoresearch_keeps_held_ratio" not in found
    metrics.retest_gain(-0.0042)
    metrics.keeps_held(2 / 3)
    found = _samples(metrics)
    assert found["autoresearch_retest_gain_bpb"] == [({}, -0.0042)]
    assert found["autoresearch_keeps_held_ratio"] == [({}, 2 / 3)]
