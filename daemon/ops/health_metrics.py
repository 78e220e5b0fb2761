"""Collectors computed at scrape time for the alerts on a failing night (deploy/prometheus/alerts.yml):
the calendar window, the database's reachability, the free disk where runs, images and the database live.

They are registered by `daemon.ops.metrics.Metrics`; nothing here touches the research loop.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.ops.logs import get_logger

PREFIX = "autoresearch_"
log = get_logger("autoresearch.metrics")


class WindowClock(Collector):
    """The scheduler's window by the calendar: open from its start to its end, whatever the session does.

    `autoresearch_window_active` (a session runs) drops when a session dies early; these do not, so the
    alerts on a failing night (nothing finishing, lanes idle) stay armed until the window really ends.
    """

    def __init__(self, wall_clock: Callable[[], float]) -> None:
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._start: float | None = None
        self._end: float | None = None

    def open(self, start: datetime, end: datetime | None) -> None:
        with self._lock:
            self._start = start.timestamp()
            self._end = end.timestamp() if end is not None else None

    def state(self) -> tuple[bool, float, float]:
        """(open now, start or 0, end or 0); a window without a known end stays open until the next one."""
        now = self._wall_clock()
        with self._lock:
            start, end = self._start, self._end
        if start is None or now < start or (end is not None and now >= end):
            return False, 0.0, 0.0
        return True, start, end or 0.0

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        is_open, start, end = self.state()
        yield GaugeMetricFamily(f"{PREFIX}window_open", "1 from a scheduled window's start to its end "
                                "(stays 1 when the session ends early)", value=1 if is_open else 0)
        yield GaugeMetricFamily(f"{PREFIX}window_started_timestamp_seconds",
                                "Unix time the scheduled window open now started (0 outside a window)", value=start)
        yield GaugeMetricFamily(f"{PREFIX}window_end_timestamp_seconds",
                                "Unix time the scheduled window open now ends (0 outside a window)", value=end)


class DatabaseUp(Collector):
    """`autoresearch_db_up`: 1 while the last ping answered and is recent, 0 otherwise; absent before the first.

    The pings run in `DatabasePinger`'s thread, never in a scrape: an unreachable host can take a
    connect timeout to answer, longer than Prometheus waits for /metrics.
    """

    def __init__(self, stale_after_s: float, monotonic: Callable[[], float]) -> None:
        self.stale_after_s = stale_after_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._last: tuple[float, bool] | None = None

    def record(self, answered: bool) -> None:
        with self._lock:
            self._last = (self._monotonic(), answered)

    def value(self) -> float | None:
        with self._lock:
            last = self._last
        if last is None:
            return None
        at, answered = last
        # A ping that hangs leaves no new record: too old counts as unreachable.
        return 1.0 if answered and self._monotonic() - at <= self.stale_after_s else 0.0

    def describe(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(f"{PREFIX}db_up", "")

    def collect(self) -> Iterable[Metric]:
        value = self.value()
        if value is not None:
            yield GaugeMetricFamily(f"{PREFIX}db_up", "1 while the database answers the daemon's pings",
                                    value=value)


class DatabasePinger:
    """A background thread pinging the database every `interval_s` into `DatabaseUp.record`."""

    def __init__(self, ping: Callable[[], object], record: Callable[[bool], None], interval_s: float) -> None:
        self._ping, self._record, self._interval_s = ping, record, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="autoresearch-db-ping", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                answered = self._ping() is not False
            except Exception as exc:  # any failure means "unreachable"; the reason goes to the log once a ping
                log.warning("database ping failed", error=f"{type(exc).__name__}: {str(exc)[:300]}")
                answered = False
            self._record(answered)
            if self._stop.wait(self._interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class DiskSpace(Collector):
    """`autoresearch_disk_free_bytes` / `_size_bytes` {use, path} for each watched directory, read at scrape.

    `use` says what lives there (workspace, runs, data, images, database); a directory that does not
    exist (yet), or cannot be read, is left out rather than reported as empty.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: dict[str, Path] = {}

    def watch(self, paths: Mapping[str, Path | str | None]) -> None:
        with self._lock:
            for use, path in paths.items():
                if path is not None and str(path):
                    self._paths[use] = Path(path)

    def describe(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(f"{PREFIX}disk_free_bytes", "", labels=["use", "path"])
        yield GaugeMetricFamily(f"{PREFIX}disk_size_bytes", "", labels=["use", "path"])

    def collect(self) -> Iterable[Metric]:
        free = GaugeMetricFamily(f"{PREFIX}disk_free_bytes", "Bytes available to the daemon on the file system "
                                 "of each directory it writes to", labels=["use", "path"])
        size = GaugeMetricFamily(f"{PREFIX}disk_size_bytes", "Size of that file system", labels=["use", "path"])
        with self._lock:
            paths = sorted(self._paths.items())
        for use, path in paths:
            try:
                stat = os.statvfs(path)
            except OSError:
                continue
            free.add_metric([use, str(path)], float(stat.f_bavail * stat.f_frsize))
            size.add_metric([use, str(path)], float(stat.f_blocks * stat.f_frsize))
        yield free
        yield size


def local_docker_root(timeout_s: float = 5.0) -> Path | None:
    """Docker's data root (its images and layers) when it is a directory on this machine, else None.

    Through a socket proxy or a remote DOCKER_HOST the daemon's root is on another host: nothing to
    watch here. A proxy must allow `GET /info` for this (deploy/README.md, "The Docker socket").
    """
    try:
        import docker

        client = docker.from_env(timeout=int(timeout_s))
        try:
            root = client.info().get("DockerRootDir")
        finally:
            client.close()
    except Exception:  # no engine, a proxy that forbids /info: the disk alert covers the other paths
        return None
    if not root or not os.path.isdir(root):
        return None
    return Path(root)
