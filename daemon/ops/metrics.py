"""Prometheus metrics of the daemon, on a registry of their own (never the process-global one).

Every name and label set is pinned in docs/contracts.md ("Metrics"). The research loop does not touch
prometheus_client objects; it calls the methods of one `Metrics` instance:

    metrics = Metrics(training_budget_s=settings.training.time_budget_s, cost_cap_usd=...)
    metrics.window(True, window.start, window.end)                  # the scheduler opened a window
    metrics.window(False)                                           # its session ended (the window may not)
    metrics.session_ended("failed")                                 # completed | interrupted | failed
    metrics.watch_disks({"workspace": path, "images": docker_root})  # free bytes, read at scrape time
    metrics.database_up(store.ping() is not False)                  # or DatabasePinger in the background
    metrics.lane_busy("gpu0", True) ... metrics.lane_busy("gpu0", False)
    metrics.stage_finished("train", seconds=312.4, overhead_s=1.9)
    metrics.experiment_finished("candidate", "kept", "gpu0", val_bpb=0.991, duration_s=340.0)
    metrics.best(0.991)                                             # a new best (also stamps the improvement time)
    metrics.baseline(0.9979); metrics.noise_std(0.0004)
    metrics.consecutive_crashes(0)
    metrics.retest_gain(-0.004); metrics.keeps_held(0.75)          # after the morning re-test
    metrics.agent_call("anthropic", "claude-sonnet-5-5", "ok", input_tokens=..., output_tokens=...,
                       cache_read_tokens=..., cache_write_tokens=..., cost_usd=0.12, latency_s=41.0)
    metrics.cost(tonight_usd=3.2, cap_usd=20.0)
    metrics.gpu_quarantined(uuid, True); metrics.foreign_processes(uuid, 2)

`metrics.registry` is what the HTTP server (daemon.ops.http) exposes on `/metrics`. All methods are thread
safe (prometheus_client's own locking, plus one lock for the busy-time bookkeeping).
"""

from __future__ import annotations

import importlib.metadata
import platform
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.ops.health_metrics import DatabaseUp, DiskSpace, WindowClock

PREFIX = "autoresearch_"
AGENT_TOKEN_KINDS = ("input", "output", "cache_read", "cache_write")
SESSION_STATUSES = ("completed", "interrupted", "failed")

# Experiments last minutes (budget 5 min + start-up + eval); stages from seconds to the budget.
_EXPERIMENT_BUCKETS = (30, 60, 120, 180, 240, 300, 360, 420, 600, 900, 1200, 1800, 3600)
_STAGE_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 360, 600, 1200)
_OVERHEAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_AGENT_LATENCY_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


def _installed_version(distribution: str) -> str:
    # Read from package metadata: importing torch only to print its version costs seconds.
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "none"


class _LaneBusyTime(Collector):
    """`autoresearch_lane_busy_seconds_total`, including the running part of a busy period at scrape time.

    A plain Counter would only grow when an experiment ends, so a 5-minute run would show as a step;
    computing it at scrape time makes `rate()` a true duty cycle.
    """

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._accumulated: dict[str, float] = {}
        self._busy_since: dict[str, float] = {}
        self._idle_since: dict[str, float] = {}

    def register(self, lane: str) -> None:
        """Show the lane (at 0 busy seconds) before its first experiment: a night whose lanes never ran
        must still show them idle, not absent."""
        now = self._monotonic()
        with self._lock:
            self._accumulated.setdefault(lane, 0.0)
            if lane not in self._busy_since:
                self._idle_since.setdefault(lane, now)

    def set_busy(self, lane: str, busy: bool) -> None:
        now = self._monotonic()
        with self._lock:
            self._accumulated.setdefault(lane, 0.0)
            since = self._busy_since.pop(lane, None)
            if since is not None:
                self._accumulated[lane] += now - since
            if busy:
                self._busy_since[lane] = now
                self._idle_since.pop(lane, None)
            elif since is not None or lane not in self._idle_since:
                self._idle_since[lane] = now

    def collect(self) -> Iterable[Metric]:
        now = self._monotonic()
        family = CounterMetricFamily(
            f"{PREFIX}lane_busy_seconds", "Seconds each lane spent running an experiment", labels=["lane"]
        )
        idle = GaugeMetricFamily(f"{PREFIX}lane_idle_seconds",
                                 "Seconds since the lane last ran an experiment (0 while it runs one)", labels=["lane"])
        with self._lock:
            for lane, seconds in sorted(self._accumulated.items()):
                since = self._busy_since.get(lane)
                family.add_metric([lane], seconds + (now - since if since is not None else 0.0))
                idle_since = self._idle_since.get(lane)
                idle.add_metric([lane], now - idle_since if since is None and idle_since is not None else 0.0)
        yield family
        yield idle


class _KnownGauge(Collector):
    """A gauge absent from /metrics until its value is known: a 0 before the baseline is measured would
    read as a real val_bpb on a dashboard and in alert rules."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name, self.documentation = name, documentation
        self._lock = threading.Lock()
        self._value: float | None = None

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def clear(self) -> None:
        with self._lock:
            self._value = None

    def get(self) -> float | None:
        with self._lock:
            return self._value

    def describe(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterable[Metric]:
        value = self.get()
        if value is not None:
            yield GaugeMetricFamily(self.name, self.documentation, value=value)


class Metrics:
    """All metrics of one daemon process, registered on `self.registry`."""

    def __init__(
        self,
        *,
        training_budget_s: float = 0.0,
        cost_cap_usd: float = 0.0,
        registry: CollectorRegistry | None = None,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        db_stale_after_s: float = 60.0,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._wall_clock = wall_clock
        reg = self.registry
        p = PREFIX

        self.experiments_total = Counter(
            f"{p}experiments", "Experiments finished, by final status", ["status", "lane", "kind"], registry=reg
        )
        self.best_val_bpb = _KnownGauge(f"{p}best_val_bpb", "Best val_bpb of the current session (absent until known)")
        self.baseline_val_bpb = _KnownGauge(f"{p}baseline_val_bpb",
                                            "Baseline val_bpb of the current session (absent until measured)")
        reg.register(self.best_val_bpb)
        reg.register(self.baseline_val_bpb)
        self.last_val_bpb = Gauge(f"{p}last_val_bpb", "val_bpb of the lane's last evaluated experiment", ["lane"],
                                  registry=reg)
        self.noise_std_bpb = _KnownGauge(f"{p}noise_std_bpb",
                                         "Standard deviation of repeated baseline runs (absent until measured)")
        reg.register(self.noise_std_bpb)
        self.step_spread_ratio = _KnownGauge(
            f"{p}step_spread_ratio", "Most / fewest training steps among repeats of one train.py this session "
            "(1 on a quiet machine; above 1.2 the machine's load, not the seed, sets the noise; absent until a "
            "source was repeated)")
        reg.register(self.step_spread_ratio)
        self.retest_gain_bpb = _KnownGauge(
            f"{p}retest_gain_bpb", "The last re-test's end best minus start best, mean over fresh paired seeds "
            "(negative: the night's gain; absent until a re-test measured it)")
        self.keeps_held_ratio = _KnownGauge(
            f"{p}keeps_held_ratio", "Share of the last re-tested session's keeps whose gain held on fresh seeds "
            "(absent until one was re-tested)")
        reg.register(self.retest_gain_bpb)
        reg.register(self.keeps_held_ratio)
        self.lane_info_gauge = Gauge(f"{p}lane_info", "1 per lane, naming its GPU by UUID and NVML index",
                                     ["lane", "gpu_uuid", "gpu_index"], registry=reg)
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds... of the daemon itself
        ProcessCollector(registry=reg)
        self.experiment_duration = Histogram(
            f"{p}experiment_duration_seconds", "Wall time of one experiment, claim to verdict", ["lane"],
            buckets=_EXPERIMENT_BUCKETS, registry=reg,
        )
        self.stage_duration = Histogram(
            f"{p}stage_duration_seconds", "Wall time of one sandbox stage", ["stage"], buckets=_STAGE_BUCKETS,
            registry=reg,
        )
        self.sandbox_overhead = Histogram(
            f"{p}sandbox_overhead_seconds", "Stage wall time not spent in the trainer (create, start, teardown)",
            ["stage"], buckets=_OVERHEAD_BUCKETS, registry=reg,
        )
        self.lane_busy_gauge = Gauge(f"{p}lane_busy", "1 while the lane runs an experiment", ["lane"], registry=reg)
        self._lane_busy_time = _LaneBusyTime(monotonic)
        reg.register(self._lane_busy_time)
        self.foreign_gpu_processes = Gauge(
            f"{p}foreign_gpu_processes", "Compute processes on the GPU that are not ours", ["gpu"], registry=reg
        )
        self.gpu_quarantined_gauge = Gauge(
            f"{p}gpu_quarantined", "1 while the GPU is withheld from experiments", ["gpu"], registry=reg
        )
        self.window_active = Gauge(f"{p}window_active", "1 while a window's research session runs", registry=reg)
        self._window_clock = WindowClock(wall_clock)
        reg.register(self._window_clock)
        self.sessions_ended = Counter(f"{p}sessions_ended", "Research sessions ended, by status", ["status"],
                                      registry=reg)
        for status in SESSION_STATUSES:  # at 0 from the start: increase() sees the first failure
            self.sessions_ended.labels(status)
        self._db_up = DatabaseUp(stale_after_s=db_stale_after_s, monotonic=monotonic)
        reg.register(self._db_up)
        self._disks = DiskSpace()
        reg.register(self._disks)
        self.smoke_runs = Counter(f"{p}smoke_runs", "Smoke runs of candidates, by outcome (passed/crashed/...)",
                                  ["outcome"], registry=reg)
        self.smoke_seconds = Histogram(f"{p}smoke_run_seconds", "Wall time of one smoke run (train + eval check)",
                                       buckets=_STAGE_BUCKETS, registry=reg)
        self.crashes_caught = Counter(f"{p}crashes_caught", "Candidate crashes, by where they were caught "
                                      "(smoke: seconds spent; full: a full run spent)", ["stage"], registry=reg)
        self.agent_requests = Counter(
            f"{p}agent_requests", "LLM requests, by outcome", ["provider", "model", "outcome"], registry=reg
        )
        self.agent_tokens = Counter(f"{p}agent_tokens", "LLM tokens, by kind", ["model", "kind"], registry=reg)
        self.agent_cost = Counter(f"{p}agent_cost_usd", "LLM spending in US dollars", ["model"], registry=reg)
        self.agent_latency = Histogram(
            f"{p}agent_latency_seconds", "Latency of one LLM request", ["provider"],
            buckets=_AGENT_LATENCY_BUCKETS, registry=reg,
        )
        self.cost_tonight_usd = Gauge(f"{p}cost_tonight_usd", "LLM spending since the window opened", registry=reg)
        self.cost_cap_usd = Gauge(f"{p}cost_cap_usd", "Configured nightly LLM spending cap", registry=reg)
        self.consecutive_crashes_gauge = Gauge(
            f"{p}consecutive_crashes", "Experiments that crashed in a row (reset by any success)", registry=reg
        )
        self.last_finished_ts = Gauge(
            f"{p}last_experiment_finished_timestamp_seconds", "Unix time the last experiment finished", registry=reg
        )
        self.last_improvement_ts = Gauge(
            f"{p}last_improvement_timestamp_seconds", "Unix time the best val_bpb last improved", registry=reg
        )
        self.training_budget_seconds = Gauge(
            f"{p}training_budget_seconds", "Training wall-clock budget per experiment", registry=reg
        )
        self.build_info = Gauge(f"{p}build_info", "Versions of this daemon", ["version", "python", "torch"],
                                registry=reg)

        self.build_info.labels(
            _installed_version("autoresearch-daemon"), platform.python_version(), _installed_version("torch")
        ).set(1)
        self.training_budget_seconds.set(training_budget_s)
        self.cost_cap_usd.set(cost_cap_usd)

    def experiment_finished(
        self, kind: str, status: str, lane: str, val_bpb: float | None, duration_s: float | None
    ) -> None:
        """An experiment reached a final status; `val_bpb` is None when it never got evaluated."""
        self.experiments_total.labels(status, lane, kind).inc()
        if kind == "candidate" and status in ("crashed", "timeout", "oom", "invalid"):
            self.crashes_caught.labels("full").inc()
        if val_bpb is not None:
            self.last_val_bpb.labels(lane).set(val_bpb)
        if duration_s is not None:
            self.experiment_duration.labels(lane).observe(duration_s)
        self.last_finished_ts.set(self._wall_clock())

    def smoke_run(self, outcome: str, seconds: float) -> None:
        """A candidate's smoke run ended (`passed`, or the failure status)."""
        self.smoke_runs.labels(outcome).inc()
        self.smoke_seconds.observe(max(seconds, 0.0))
        if outcome != "passed":
            self.crashes_caught.labels("smoke").inc()

    def stage_finished(self, stage: str, seconds: float, overhead_s: float) -> None:
        """A sandbox stage (`train`/`eval`) ended: its wall time and the part not spent in the trainer."""
        self.stage_duration.labels(stage).observe(seconds)
        self.sandbox_overhead.labels(stage).observe(max(overhead_s, 0.0))

    def lane_info(self, lane: str, gpu_uuid: str | None, gpu_index: int | None) -> None:
        """Tie a lane to its GPU (`none` for a CPU lane or an unknown index)."""
        self.lane_info_gauge.labels(lane, gpu_uuid or "none", "none" if gpu_index is None else str(gpu_index)).set(1)
        self.lane_busy_gauge.labels(lane).set(0)
        self._lane_busy_time.register(lane)

    def lane_busy(self, lane: str, busy: bool) -> None:
        """A lane started (True) or stopped (False) running an experiment."""
        self.lane_busy_gauge.labels(lane).set(1 if busy else 0)
        self._lane_busy_time.set_busy(lane, busy)

    def agent_call(
        self,
        provider: str,
        model: str,
        outcome: str,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        cost_usd: float = 0.0,
        latency_s: float | None = None,
    ) -> None:
        """One LLM request ended (`outcome`: ok, error, retry, refused...), with its tokens and price."""
        self.agent_requests.labels(provider, model, outcome).inc()
        counts = (input_tokens, output_tokens, cache_read_tokens, cache_write_tokens)
        for kind, count in zip(AGENT_TOKEN_KINDS, counts, strict=True):
            if count:
                self.agent_tokens.labels(model, kind).inc(count)
        if cost_usd:
            self.agent_cost.labels(model).inc(cost_usd)
        if latency_s is not None:
            self.agent_latency.labels(provider).observe(latency_s)

    def window(self, active: bool, started_at: datetime | None = None, ends_at: datetime | None = None) -> None:
        """The scheduler opened a window (its start and end), or the window's session ended (`False`).

        Ending the session leaves the calendar window (`autoresearch_window_open`, its start and end
        timestamps) as it is: a session that dies at 22:05 still leaves a window open until 07:00.
        """
        self.window_active.set(1 if active else 0)
        if active and started_at is not None:
            self._window_clock.open(started_at, ends_at)

    def session_ended(self, status: str) -> None:
        """A research session ended: completed, interrupted or failed."""
        self.sessions_ended.labels(status).inc()

    def database_up(self, answered: bool) -> None:
        """The result of one database ping (`DatabasePinger` calls this every few seconds)."""
        self._db_up.record(answered)

    def watch_disks(self, paths: dict[str, Path | str | None]) -> None:
        """Report free space for these directories, by what they hold (workspace, runs, images, database)."""
        self._disks.watch(paths)

    def best(self, val_bpb: float, improved_at: datetime | None = None) -> None:
        """The session's best changed (baseline or a kept candidate)."""
        self.best_val_bpb.set(val_bpb)
        self.last_improvement_ts.set(improved_at.timestamp() if improved_at is not None else self._wall_clock())

    def baseline(self, val_bpb: float) -> None:
        self.baseline_val_bpb.set(val_bpb)

    def noise_std(self, std_bpb: float) -> None:
        self.noise_std_bpb.set(std_bpb)

    def step_spread(self, ratio: float) -> None:
        self.step_spread_ratio.set(ratio)

    def retest_gain(self, delta_bpb: float) -> None:
        self.retest_gain_bpb.set(delta_bpb)

    def keeps_held(self, ratio: float) -> None:
        self.keeps_held_ratio.set(ratio)

    def consecutive_crashes(self, count: int) -> None:
        self.consecutive_crashes_gauge.set(count)

    def cost(self, tonight_usd: float, cap_usd: float | None = None) -> None:
        self.cost_tonight_usd.set(tonight_usd)
        if cap_usd is not None:
            self.cost_cap_usd.set(cap_usd)

    def gpu_quarantined(self, gpu_uuid: str, quarantined: bool) -> None:
        self.gpu_quarantined_gauge.labels(gpu_uuid).set(1 if quarantined else 0)

    def foreign_processes(self, gpu_uuid: str, count: int) -> None:
        self.foreign_gpu_processes.labels(gpu_uuid).set(count)
