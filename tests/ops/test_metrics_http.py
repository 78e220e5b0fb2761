"""Metrics registry and the daemon's HTTP endpoint, over real HTTP on an ephemeral port."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from daemon.errors import AutoresearchError
from daemon.ops.http import DaemonHTTPServer, Heartbeat, start_http_server
from daemon.ops.metrics import Metrics

CONTRACT_METRICS = {
    "autoresearch_experiments": ("counter", {"status", "lane", "kind"}),
    "autoresearch_best_val_bpb": ("gauge", set()),
    "autoresearch_baseline_val_bpb": ("gauge", set()),
    "autoresearch_last_val_bpb": ("gauge", {"lane"}),
    "autoresearch_noise_std_bpb": ("gauge", set()),
    "autoresearch_step_spread_ratio": ("gauge", set()),
    "autoresearch_retest_gain_bpb": ("gauge", set()),
    "autoresearch_keeps_held_ratio": ("gauge", set()),
    "autoresearch_experiment_duration_seconds": ("histogram", {"lane"}),
    "autoresearch_stage_duration_seconds": ("histogram", {"stage"}),
    "autoresearch_sandbox_overhead_seconds": ("histogram", {"stage"}),
    "autoresearch_lane_busy": ("gauge", {"lane"}),
    "autoresearch_lane_busy_seconds": ("counter", {"lane"}),
    "autoresearch_foreign_gpu_processes": ("gauge", {"gpu"}),
    "autoresearch_gpu_quarantined": ("gauge", {"gpu"}),
    "autoresearch_window_active": ("gauge", set()),
    "autoresearch_agent_requests": ("counter", {"provider", "model", "outcome"}),
    "autoresearch_agent_tokens": ("counter", {"model", "kind"}),
    "autoresearch_agent_cost_usd": ("counter", {"model"}),
    "autoresearch_agent_latency_seconds": ("histogram", {"provider"}),
    "autoresearch_cost_tonight_usd": ("gauge", set()),
    "autoresearch_cost_cap_usd": ("gauge", set()),
    "autoresearch_consecutive_crashes": ("gauge", set()),
    "autoresearch_last_experiment_finished_timestamp_seconds": ("gauge", set()),
    "autoresearch_last_improvement_timestamp_seconds": ("gauge", set()),
    "autoresearch_window_started_timestamp_seconds": ("gauge", set()),
    "autoresearch_training_budget_seconds": ("gauge", set()),
    "autoresearch_build_info": ("gauge", {"version", "python", "torch"}),
    "autoresearch_lane_info": ("gauge", {"lane", "gpu_uuid", "gpu_index"}),
    "autoresearch_smoke_runs": ("counter", {"outcome"}),
    "autoresearch_smoke_run_seconds": ("histogram", set()),
    "autoresearch_crashes_caught": ("counter", {"stage"}),
    "autoresearch_window_open": ("gauge", set()),
    "autoresearch_window_end_timestamp_seconds": ("gauge", set()),
    "autoresearch_sessions_ended": ("counter", {"status"}),
    "autoresearch_db_up": ("gauge", set()),
    "autoresearch_disk_free_bytes": ("gauge", {"use", "path"}),
    "autoresearch_disk_size_bytes": ("gauge", {"use", "path"}),
    "autoresearch_lane_idle_seconds": ("gauge", {"lane"}),
}


class FakeMonotonic:
    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value


def exercised_metrics(monotonic: Callable[[], float] | None = None) -> Metrics:
    kwargs = {"monotonic": monotonic} if monotonic is not None else {}
    metrics = Metrics(training_budget_s=300.0, cost_cap_usd=20.0, **kwargs)
    metrics.window(True, datetime(2026, 11, 2, 22, 0, tzinfo=timezone.utc))
    metrics.lane_info("gpu0", "GPU-0", 0)
    metrics.lane_busy("gpu0", True)
    metrics.stage_finished("train", 310.0, 1.5)
    metrics.smoke_run("crashed", 4.0)
    metrics.experiment_finished("candidate", "kept", "gpu0", 0.99, 340.0)
    metrics.best(0.99)
    metrics.baseline(1.0)
    metrics.noise_std(0.0004)
    metrics.step_spread(1.02)
    metrics.consecutive_crashes(0)
    metrics.retest_gain(-0.004)
    metrics.keeps_held(0.5)
    metrics.agent_call("anthropic", "claude-sonnet-5-5", "ok", input_tokens=1200, output_tokens=300,
                       cache_read_tokens=800, cache_write_tokens=100, cost_usd=0.02, latency_s=12.0)
    metrics.cost(0.02)
    metrics.gpu_quarantined("GPU-1", False)
    metrics.foreign_processes("GPU-1", 0)
    metrics.session_ended("completed")
    metrics.database_up(True)
    metrics.watch_disks({"workspace": "/"})
    return metrics


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


@pytest.fixture()
def serve() -> Iterator[Callable[..., DaemonHTTPServer]]:
    servers: list[DaemonHTTPServer] = []

    def _serve(metrics: Metrics, db_ping: Callable[[], object], heartbeat: Heartbeat,
               status_page: Callable[[], str] | None = None) -> DaemonHTTPServer:
        server = start_http_server("127.0.0.1", 0, metrics.registry, db_ping=db_ping, heartbeat=heartbeat,
                                   status_page=status_page)
        servers.append(server)
        return server

    yield _serve
    for server in servers:
        server.close()


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_every_contract_metric_is_exposed_with_its_type_and_labels() -> None:
    """Every metric of docs/contracts.md appears with exactly the pinned type and label names."""
    from prometheus_client import generate_latest

    metrics = exercised_metrics()
    found = families(generate_latest(metrics.registry).decode())
    for name, (kind, labels) in CONTRACT_METRICS.items():
        assert name in found, name
        family = found[name]
        assert family.type == kind, name
        sample_labels = {k for s in family.samples for k in s.labels if k not in ("le",)}
        assert sample_labels == labels, name
    assert {n for n in found if n.startswith("autoresearch_") and not n.endswith("_created")} == set(CONTRACT_METRICS)


def test_metrics_use_their_own_registry() -> None:
    """Two Metrics objects coexist and nothing lands on prometheus_client's global registry."""
    exercised_metrics()
    exercised_metrics()
    assert REGISTRY.get_sample_value("autoresearch_window_active") is None


def test_lane_busy_seconds_include_the_running_period() -> None:
    """Busy time grows while a lane is still busy, and stops growing when it is released."""
    clock = FakeMonotonic()
    metrics = Metrics(monotonic=clock)
    metrics.lane_busy("gpu0", True)
    clock.value += 30
    assert metrics.registry.get_sample_value("autoresearch_lane_busy_seconds_total", {"lane": "gpu0"}) == 30
    clock.value += 10
    metrics.lane_busy("gpu0", False)
    clock.value += 100
    assert metrics.registry.get_sample_value("autoresearch_lane_busy_seconds_total", {"lane": "gpu0"}) == 40
    assert metrics.registry.get_sample_value("autoresearch_lane_busy", {"lane": "gpu0"}) == 0


def test_agent_call_counts_tokens_by_kind_and_cost() -> None:
    """Tokens are split by kind and the dollar cost accumulates per model."""
    metrics = Metrics()
    for _ in range(2):
        metrics.agent_call("anthropic", "m", "ok", input_tokens=10, output_tokens=5, cost_usd=0.5, latency_s=3)
    value = metrics.registry.get_sample_value
    assert value("autoresearch_agent_tokens_total", {"model": "m", "kind": "input"}) == 20
    assert value("autoresearch_agent_tokens_total", {"model": "m", "kind": "output"}) == 10
    assert value("autoresearch_agent_cost_usd_total", {"model": "m"}) == 1.0
    assert value("autoresearch_agent_requests_total", {"provider": "anthropic", "model": "m", "outcome": "ok"}) == 2


class FakeWallClock:
    def __init__(self, at: datetime) -> None:
        self.value = at.timestamp()

    def __call__(self) -> float:
        return self.value


def test_window_stays_open_by_the_calendar_when_its_session_ends_early() -> None:
    """A session that ends at 22:05 drops window_active, but window_open and its start stay until 07:00."""
    start, end = datetime(2026, 11, 2, 22, 0, tzinfo=timezone.utc), datetime(2026, 11, 3, 7, 0, tzinfo=timezone.utc)
    clock = FakeWallClock(start)
    metrics = Metrics(wall_clock=clock)
    value = metrics.registry.get_sample_value
    assert value("autoresearch_window_open") == 0
    metrics.window(True, start, end)
    clock.value += 300
    metrics.window(False)
    assert value("autoresearch_window_active") == 0
    assert value("autoresearch_window_open") == 1
    assert value("autoresearch_window_started_timestamp_seconds") == start.timestamp()
    assert value("autoresearch_window_end_timestamp_seconds") == end.timestamp()
    clock.value = end.timestamp()
    assert value("autoresearch_window_open") == 0
    assert value("autoresearch_window_started_timestamp_seconds") == 0


def test_session_statuses_start_at_zero_so_the_first_failure_counts() -> None:
    """sessions_ended_total has a 0 for each status before any session ends (increase() needs it)."""
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    assert [value("autoresearch_sessions_ended_total", {"status": s}) for s in ("completed", "interrupted",
                                                                              "failed")] == [0, 0, 0]
    metrics.session_ended("failed")
    assert value("autoresearch_sessions_ended_total", {"status": "failed"}) == 1


def test_lanes_show_idle_from_registration_before_their_first_run() -> None:
    """A lane that never ran shows 0 busy seconds and an idle time growing from its registration."""
    clock = FakeMonotonic()
    metrics = Metrics(monotonic=clock)
    metrics.lane_info("gpu0", "GPU-0", 0)
    clock.value += 7200
    value = metrics.registry.get_sample_value
    assert value("autoresearch_lane_busy_seconds_total", {"lane": "gpu0"}) == 0
    assert value("autoresearch_lane_idle_seconds", {"lane": "gpu0"}) == 7200
    metrics.lane_busy("gpu0", True)
    clock.value += 60
    assert value("autoresearch_lane_idle_seconds", {"lane": "gpu0"}) == 0
    metrics.lane_busy("gpu0", False)
    clock.value += 45
    assert value("autoresearch_lane_idle_seconds", {"lane": "gpu0"}) == 45


def test_db_up_is_absent_until_pinged_then_follows_the_pings_and_goes_stale() -> None:
    """db_up: absent before the first ping, 1 after an answer, 0 after a failure or when pings stop arriving."""
    clock = FakeMonotonic()
    metrics = Metrics(monotonic=clock, db_stale_after_s=60)
    value = metrics.registry.get_sample_value
    assert value("autoresearch_db_up") is None
    metrics.database_up(True)
    assert value("autoresearch_db_up") == 1
    metrics.database_up(False)
    assert value("autoresearch_db_up") == 0
    metrics.database_up(True)
    clock.value += 61  # the pinger hangs on a connect: no news is bad news
    assert value("autoresearch_db_up") == 0


def test_database_pinger_records_failures_of_a_raising_ping() -> None:
    """DatabasePinger turns a raising ping into db_up 0 and a True answer into 1."""
    import threading

    from daemon.ops.health_metrics import DatabasePinger

    metrics = Metrics()
    answers = iter([RuntimeError("connection refused"), True])
    seen = threading.Event()

    def ping() -> object:
        answer = next(answers, True)
        if isinstance(answer, Exception):
            raise answer
        seen.set()
        return answer

    pinger = DatabasePinger(ping, metrics.database_up, interval_s=0.01)
    try:
        assert seen.wait(10)
    finally:
        pinger.stop()
    assert metrics.registry.get_sample_value("autoresearch_db_up") == 1


def test_disk_free_reports_each_watched_path_and_skips_missing_ones(tmp_path) -> None:
    """Free and total bytes per watched directory, as statvfs says; a missing directory is left out."""
    import os

    metrics = Metrics()
    metrics.watch_disks({"workspace": tmp_path, "images": tmp_path / "absent", "database": None})
    stat = os.statvfs(tmp_path)
    value = metrics.registry.get_sample_value
    labels = {"use": "workspace", "path": str(tmp_path)}
    assert value("autoresearch_disk_size_bytes", labels) == stat.f_blocks * stat.f_frsize
    assert 0 < value("autoresearch_disk_free_bytes", labels) <= stat.f_blocks * stat.f_frsize
    assert value("autoresearch_disk_free_bytes", {"use": "images", "path": str(tmp_path / "absent")}) is None


def test_metrics_endpoint_serves_prometheus_text(serve) -> None:
    """GET /metrics answers the text exposition format with our samples."""
    heartbeat = Heartbeat(60)
    server = serve(exercised_metrics(), lambda: None, heartbeat)
    status, content_type, body = get(server.url + "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert 'autoresearch_experiments_total{kind="candidate",lane="gpu0",status="kept"} 1.0' in body


def test_healthz_ok_when_db_answers_and_loop_beats(serve) -> None:
    """/healthz is 200 when the DB ping succeeds and the heartbeat is fresh."""
    heartbeat = Heartbeat(60)
    heartbeat.beat()
    server = serve(Metrics(), lambda: None, heartbeat)
    assert get(server.url + "/healthz")[0] == 200


def test_healthz_503_when_database_is_down(serve) -> None:
    """A failing DB ping gives 503 with the reason."""
    heartbeat = Heartbeat(60)
    heartbeat.beat()

    def ping() -> None:
        raise ConnectionRefusedError("connection refused")

    server = serve(Metrics(), ping, heartbeat)
    status, _, body = get(server.url + "/healthz")
    assert status == 503
    assert "database unreachable" in body


def test_healthz_503_when_the_ping_answers_false(serve) -> None:
    """A ping that reports failure by returning False (as Store.ping does) gives 503 too."""
    heartbeat = Heartbeat(60)
    heartbeat.beat()
    server = serve(Metrics(), lambda: False, heartbeat)
    status, _, body = get(server.url + "/healthz")
    assert status == 503
    assert "database unreachable" in body


def test_healthz_503_before_first_heartbeat(serve) -> None:
    """A loop that never ticked is not healthy."""
    server = serve(Metrics(), lambda: None, Heartbeat(60))
    status, _, body = get(server.url + "/healthz")
    assert status == 503
    assert "not started" in body


def test_healthz_503_when_heartbeat_is_stale(serve) -> None:
    """A heartbeat older than its limit gives 503 saying how long the loop was silent."""
    clock = FakeMonotonic()
    heartbeat = Heartbeat(60, monotonic=clock)
    heartbeat.beat()
    clock.value += 61
    server = serve(Metrics(), lambda: None, heartbeat)
    status, _, body = get(server.url + "/healthz")
    assert status == 503
    assert re.search(r"silent for 61 s", body)


def test_status_page_is_served_as_html(serve) -> None:
    """/ serves the callable's HTML; unknown paths answer 404."""
    heartbeat = Heartbeat(60)
    server = serve(Metrics(), lambda: None, heartbeat, status_page=lambda: "<html>hello</html>")
    status, content_type, body = get(server.url + "/")
    assert (status, body) == (200, "<html>hello</html>")
    assert content_type.startswith("text/html")
    assert get(server.url + "/nope")[0] == 404


def test_failing_status_page_answers_500_and_server_keeps_serving(serve) -> None:
    """An exception in the page gives 500, and /metrics still works afterwards."""
    def broken() -> str:
        raise RuntimeError("store closed")

    server = serve(Metrics(), lambda: None, Heartbeat(60), status_page=broken)
    assert get(server.url + "/")[0] == 500
    assert get(server.url + "/metrics")[0] == 200


def test_port_in_use_raises_clear_error(serve) -> None:
    """Binding a taken port raises AutoresearchError naming the setting to change."""
    first = serve(Metrics(), lambda: None, Heartbeat(60))
    with pytest.raises(AutoresearchError) as info:
        start_http_server("127.0.0.1", first.port, Metrics().registry, db_ping=lambda: None, heartbeat=Heartbeat(60))
    assert "metrics" in info.value.hint


def test_heartbeat_rejects_nonpositive_limit() -> None:
    """A zero heartbeat limit is refused with a clear message."""
    with pytest.raises(ValueError, match="positive"):
        Heartbeat(0)


def test_scheduler_gives_the_window_its_end_so_the_gauge_outlives_the_session() -> None:
    """A daemon started inside a window: the scheduler passes start and end, window_open stays 1 after the session."""
    from zoneinfo import ZoneInfo

    from daemon.config import IdleConfig, SchedulerConfig, WindowConfig
    from daemon.service.scheduler import Scheduler
    from sandbox.gpu import NoGpuProbe

    berlin = ZoneInfo("Europe/Berlin")
    now = datetime(2026, 11, 5, 3, 0, tzinfo=berlin)  # Thursday 03:00, inside Wednesday's 22:00 + 9 h window

    class Clock:
        def now(self) -> datetime:
            return now

        def sleep(self, seconds: float) -> None:
            pass

    metrics = Metrics(wall_clock=lambda: now.timestamp())
    config = SchedulerConfig(timezone="Europe/Berlin", idle=IdleConfig(),
                             windows=[WindowConfig(cron="0 22 * * mon-fri", hours=9, name="weeknights")])
    scheduler = Scheduler(config, Clock(), NoGpuProbe(), on_window_open=lambda window: None,
                          on_gpu_joined=lambda uuid: None, own_pids=set, metrics=metrics)
    try:
        scheduler.start()
    finally:
        scheduler.shutdown()
    metrics.window(False)  # the session died at once
    value = metrics.registry.get_sample_value
    assert value("autoresearch_window_open") == 1
    assert value("autoresearch_window_end_timestamp_seconds") == datetime(2026, 11, 5, 7, 0, tzinfo=berlin).timestamp()
