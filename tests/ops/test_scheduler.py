"""Window math, the APScheduler wiring and idle-GPU harvesting, with a fake clock and a scripted fake GPU probe."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from daemon.config import IdleConfig, SchedulerConfig, WindowConfig
from daemon.ops.metrics import Metrics
from daemon.service.scheduler import GPU_POLL_JOB_ID, Scheduler, Window, current_window, next_window
from sandbox.spec import Cancel, RunStatus

BERLIN = ZoneInfo("Europe/Berlin")
NIGHTS = [WindowConfig(cron="0 22 * * mon-fri", hours=9, name="weeknights")]
WEEKEND = [WindowConfig(cron="0 18 * * fri", hours=62, name="weekend")]


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.current = now

    def now(self) -> datetime:
        return self.current

    def sleep(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)


@dataclass
class FakeGpu:
    uuid: str
    index: int
    name: str = "Fake H100"
    memory_used_mb: float = 0.0
    memory_total_mb: float = 81559.0
    utilization: float = 0.0


class ScriptedProbe:
    """The NVML seam: tests set utilization and foreign pids per GPU."""

    def __init__(self, *uuids: str) -> None:
        self.devices = {uuid: FakeGpu(uuid, i) for i, uuid in enumerate(uuids)}
        self.pids: dict[str, list[int]] = {uuid: [] for uuid in uuids}

    def gpus(self) -> list[FakeGpu]:
        return list(self.devices.values())

    def gpu_pids(self, uuid: str) -> list[int]:
        return list(self.pids[uuid])


def at(*args: int, tz: ZoneInfo = BERLIN) -> datetime:
    return datetime(*args, tzinfo=tz)


def make_scheduler(clock: FakeClock, probe: ScriptedProbe, windows: list[WindowConfig] | None = None,
                   **idle: object) -> tuple[Scheduler, list[Window], list[str]]:
    opened: list[Window] = []
    joined: list[str] = []
    config = SchedulerConfig(timezone="Europe/Berlin", windows=windows or [], idle=IdleConfig(**idle))
    scheduler = Scheduler(config, clock, probe, on_window_open=opened.append, on_gpu_joined=joined.append,
                          own_pids=lambda: {4242})
    return scheduler, opened, joined


# -- window math -----------------------------------------------------------------------------------


def test_no_window_outside_configured_hours() -> None:
    """Wednesday 15:00 is outside a 22:00 + 9 h weeknight window."""
    assert current_window(NIGHTS, "Europe/Berlin", at(2026, 11, 4, 15, 0)) is None


def test_mid_window_join_gets_the_remaining_time() -> None:
    """A daemon started Thursday 03:00 joins Wednesday's night window until 07:00."""
    window = current_window(NIGHTS, "Europe/Berlin", at(2026, 11, 5, 3, 0))
    assert window is not None
    assert window.start == at(2026, 11, 4, 22, 0)
    assert window.end == at(2026, 11, 5, 7, 0)
    assert window.remaining(at(2026, 11, 5, 3, 0)) == timedelta(hours=4)


def test_window_is_closed_at_its_exact_end() -> None:
    """At 07:00 sharp the night window is over; at 22:00 sharp the next one is open."""
    assert current_window(NIGHTS, "Europe/Berlin", at(2026, 11, 5, 7, 0)) is None
    assert current_window(NIGHTS, "Europe/Berlin", at(2026, 11, 5, 22, 0)) is not None


def test_friday_night_window_runs_into_saturday_morning() -> None:
    """A mon-fri window fires Friday 22:00 and still covers Saturday 06:59, but not Saturday 23:00."""
    assert current_window(NIGHTS, "Europe/Berlin", at(2026, 11, 7, 6, 59)) is not None
    assert current_window(NIGHTS, "Europe/Berlin", at(2026, 11, 7, 23, 0)) is None


def test_weekend_window_covers_sunday_and_ends_monday_morning() -> None:
    """A Friday 18:00 + 62 h window is open Sunday noon and closed Monday 08:00 onwards."""
    window = current_window(WEEKEND, "Europe/Berlin", at(2026, 11, 8, 12, 0))
    assert window is not None and window.name == "weekend"
    assert window.end == at(2026, 11, 9, 8, 0)
    assert current_window(WEEKEND, "Europe/Berlin", at(2026, 11, 9, 8, 0)) is None


def test_overlapping_windows_pick_the_latest_end() -> None:
    """Where a weeknight and the weekend window overlap, the later end wins."""
    window = current_window(NIGHTS + WEEKEND, "Europe/Berlin", at(2026, 11, 6, 23, 0))
    assert window is not None and window.name == "weekend"


def test_dst_fall_back_night_lasts_nine_elapsed_hours() -> None:
    """Across the October clock change the window starts at 22:00 local and lasts 9 real hours."""
    # Europe/Berlin leaves summer time at 03:00 on Sunday 2026-10-25, inside Saturday's night.
    nightly = [WindowConfig(cron="0 22 * * *", hours=9)]
    window = current_window(nightly, "Europe/Berlin", at(2026, 10, 25, 4, 0))
    assert window is not None
    assert window.start == at(2026, 10, 24, 22, 0)
    assert window.start.utcoffset() == timedelta(hours=2)
    assert window.end.astimezone(timezone.utc) - window.start.astimezone(timezone.utc) == timedelta(hours=9)
    assert window.end.hour == 6  # 9 h after 22:00 CEST is 06:00 CET
    assert window.remaining(at(2026, 10, 25, 4, 0)) == timedelta(hours=2)


def test_dst_spring_forward_window_starts_at_local_22() -> None:
    """The night after the March change starts at 22:00 CEST (UTC+2), not 22:00 UTC+1."""
    nightly = [WindowConfig(cron="0 22 * * *", hours=9)]
    window = current_window(nightly, "Europe/Berlin", at(2026, 3, 29, 23, 0))
    assert window is not None
    assert window.start.astimezone(timezone.utc) == datetime(2026, 3, 29, 20, 0, tzinfo=timezone.utc)


def test_window_math_uses_the_configured_zone_whatever_the_clock_zone() -> None:
    """A UTC 'now' is judged against the windows' local wall clock."""
    utc_now = datetime(2026, 11, 4, 21, 30, tzinfo=timezone.utc)  # 22:30 in Berlin (CET)
    assert current_window(NIGHTS, "Europe/Berlin", utc_now) is not None
    assert current_window(NIGHTS, "UTC", utc_now) is None


def test_minutely_cron_over_a_week_is_found() -> None:
    """A dense cron with a long duration resolves to the latest fire (bisection, not a 10k-step walk)."""
    dense = [WindowConfig(cron="* * * * *", hours=168)]
    now = at(2026, 11, 4, 15, 30, 20)
    window = current_window(dense, "Europe/Berlin", now)
    assert window is not None
    assert window.start == at(2026, 11, 4, 15, 30)


def test_next_window_is_the_soonest_start() -> None:
    """On Friday 12:00 the next window is the weekend one at 18:00."""
    upcoming = next_window(NIGHTS + WEEKEND, "Europe/Berlin", at(2026, 11, 6, 12, 0))
    assert upcoming is not None and upcoming.start == at(2026, 11, 6, 18, 0)


def test_naive_now_is_rejected() -> None:
    """A naive datetime raises a clear error instead of guessing a zone."""
    with pytest.raises(ValueError, match="aware"):
        current_window(NIGHTS, "Europe/Berlin", datetime(2026, 11, 4, 23, 0))


# -- APScheduler wiring ----------------------------------------------------------------------------


def test_start_mid_window_opens_it_at_once() -> None:
    """start() inside a window calls on_window_open with the window and returns it."""
    scheduler, opened, _ = make_scheduler(FakeClock(at(2026, 11, 5, 3, 0)), ScriptedProbe(), NIGHTS)
    try:
        window = scheduler.start()
    finally:
        scheduler.shutdown()
    assert window is not None and opened == [window]


def test_start_outside_window_opens_nothing() -> None:
    """start() at Wednesday 15:00 opens no window."""
    scheduler, opened, _ = make_scheduler(FakeClock(at(2026, 11, 4, 15, 0)), ScriptedProbe(), NIGHTS)
    try:
        assert scheduler.start() is None
    finally:
        scheduler.shutdown()
    assert opened == []


def test_jobs_have_stable_ids_and_safe_settings() -> None:
    """Each window is a cron job with a stable id, coalescing, one instance and a misfire grace."""
    windows = [*NIGHTS, WindowConfig(cron="0 18 * * fri", hours=62)]
    scheduler, _, _ = make_scheduler(FakeClock(at(2026, 11, 4, 15, 0)), ScriptedProbe(), windows)
    try:
        scheduler.start()
        jobs = {job.id: job for job in scheduler.jobs.get_jobs()}
    finally:
        scheduler.shutdown()
    assert set(jobs) == {"window:weeknights", "window:1", GPU_POLL_JOB_ID}
    night = jobs["window:weeknights"]
    assert night.coalesce is True
    assert night.max_instances == 1
    assert night.misfire_grace_time == 9 * 3600
    assert str(night.trigger.timezone) == "Europe/Berlin"


def test_window_job_fires_the_callback() -> None:
    """When the cron job runs (moved to now), the open window reaches on_window_open."""
    clock = FakeClock(at(2026, 11, 4, 15, 0))
    fired = threading.Event()
    opened: list[Window] = []

    def on_open(window: Window) -> None:
        opened.append(window)
        fired.set()

    config = SchedulerConfig(timezone="Europe/Berlin", windows=NIGHTS)
    scheduler = Scheduler(config, clock, ScriptedProbe(), on_window_open=on_open)
    try:
        scheduler.start()
        clock.current = at(2026, 11, 4, 22, 0, 5)  # the fake clock is now just inside the window
        scheduler.jobs.get_job("window:weeknights").modify(next_run_time=datetime.now(BERLIN))
        assert fired.wait(10)
    finally:
        scheduler.shutdown()
    assert opened[0].start == at(2026, 11, 4, 22, 0)


def test_window_sets_metrics() -> None:
    """Opening a window sets autoresearch_window_active to 1."""
    metrics = Metrics()
    config = SchedulerConfig(timezone="Europe/Berlin", windows=NIGHTS)
    scheduler = Scheduler(config, FakeClock(at(2026, 11, 5, 3, 0)), ScriptedProbe(),
                          on_window_open=lambda w: None, metrics=metrics)
    try:
        scheduler.start()
    finally:
        scheduler.shutdown()
    assert metrics.registry.get_sample_value("autoresearch_window_active") == 1


# -- idle harvesting and foreign processes ------------------------------------------------------


def test_idle_gpu_joins_after_the_configured_minutes() -> None:
    """A GPU idle (no foreign process, low utilization) for 15 minutes joins, not before."""
    clock = FakeClock(at(2026, 11, 4, 15, 0))
    probe = ScriptedProbe("GPU-a")
    scheduler, _, joined = make_scheduler(clock, probe, enabled=True, minutes=15, utilization_below=10)
    scheduler.poll_gpus()
    clock.sleep(14 * 60)
    assert not scheduler.poll_gpus()["GPU-a"].may_launch
    clock.sleep(60)
    assert scheduler.poll_gpus()["GPU-a"].may_launch
    assert joined == ["GPU-a"]
    clock.sleep(60)
    scheduler.poll_gpus()
    assert joined == ["GPU-a"]  # joins once


def test_busy_gpu_restarts_the_idle_streak() -> None:
    """Utilization above the threshold resets the idle timer."""
    clock = FakeClock(at(2026, 11, 4, 15, 0))
    probe = ScriptedProbe("GPU-a")
    scheduler, _, joined = make_scheduler(clock, probe, enabled=True, minutes=15, utilization_below=10)
    scheduler.poll_gpus()
    clock.sleep(10 * 60)
    probe.devices["GPU-a"].utilization = 80
    scheduler.poll_gpus()
    probe.devices["GPU-a"].utilization = 0
    clock.sleep(60)
    scheduler.poll_gpus()
    clock.sleep(10 * 60)
    assert not scheduler.poll_gpus()["GPU-a"].may_launch
    assert joined == []


def test_idle_harvesting_disabled_never_joins() -> None:
    """With idle harvesting off, an idle GPU outside windows may not launch."""
    clock = FakeClock(at(2026, 11, 4, 15, 0))
    scheduler, _, joined = make_scheduler(clock, ScriptedProbe("GPU-a"), enabled=False)
    scheduler.poll_gpus()
    clock.sleep(3600)
    assert not scheduler.poll_gpus()["GPU-a"].may_launch
    assert joined == []


def test_own_processes_are_not_foreign() -> None:
    """Our own sandbox pids on the GPU do not block launches."""
    clock = FakeClock(at(2026, 11, 5, 3, 0))
    probe = ScriptedProbe("GPU-a")
    probe.pids["GPU-a"] = [4242]
    scheduler, _, _ = make_scheduler(clock, probe, NIGHTS)
    assert scheduler.poll_gpus()["GPU-a"].may_launch


class Interleaving:
    """The NVML seam and our sandbox's PID set on one step counter: every look at either advances the world by a
    step, so a test fixes exactly when one of our processes starts or exits relative to the scheduler's looks."""

    def __init__(self, gpu: str, *, ours: dict[int, range], foreign: dict[int, range] | None = None) -> None:
        self.gpu, self.ours, self.foreign, self.step = gpu, ours, foreign or {}, 0
        self.devices = {gpu: FakeGpu(gpu, 0)}

    def _alive(self, table: dict[int, range]) -> set[int]:
        return {pid for pid, steps in table.items() if self.step in steps}

    def gpus(self) -> list[FakeGpu]:
        return list(self.devices.values())

    def gpu_pids(self, uuid: str) -> list[int]:
        listed = self._alive(self.ours) | self._alive(self.foreign)
        self.step += 1
        return sorted(listed)

    def own_pids(self) -> set[int]:
        alive = self._alive(self.ours)
        self.step += 1
        return alive


def _preempting(world: Interleaving) -> tuple[Scheduler, Cancel]:
    config = SchedulerConfig(timezone="Europe/Berlin", windows=NIGHTS, idle=IdleConfig(preempt=True))
    scheduler = Scheduler(config, FakeClock(at(2026, 11, 5, 3, 0)), world, on_window_open=lambda w: None,
                          own_pids=world.own_pids, gpu_uuids=[world.gpu])
    cancel = Cancel()
    scheduler.attach_run(world.gpu, cancel)
    return scheduler, cancel


@pytest.mark.parametrize("starts_at", [0, 1, 2, 3])
def test_our_process_starting_at_any_point_of_a_poll_is_not_foreign(starts_at: int) -> None:
    """A sandbox process that starts at any moment of the poll (before, between or after its looks) is ours."""
    world = Interleaving("GPU-a", ours={77: range(starts_at, 10**6)})
    scheduler, cancel = _preempting(world)
    assert scheduler.poll_gpus()["GPU-a"].foreign_pids == ()
    assert cancel.reason is None


@pytest.mark.parametrize("exits_at", [1, 2, 3])
def test_our_process_exiting_during_a_poll_is_not_foreign(exits_at: int) -> None:
    """A sandbox process that the GPU lists and that exits before the scheduler reads our PIDs is not foreign."""
    world = Interleaving("GPU-a", ours={77: range(0, exits_at)})
    scheduler, cancel = _preempting(world)
    assert scheduler.poll_gpus()["GPU-a"].foreign_pids == ()
    assert cancel.reason is None


def test_a_foreign_process_beside_ours_is_still_seen_and_preempts() -> None:
    """With our processes starting and exiting mid-poll, a real foreign job is still found and preempts."""
    world = Interleaving("GPU-a", ours={77: range(0, 1), 78: range(1, 10**6)}, foreign={999: range(0, 10**6)})
    scheduler, cancel = _preempting(world)
    assert scheduler.poll_gpus()["GPU-a"].foreign_pids == (999,)
    assert cancel.reason is RunStatus.PREEMPTED


def test_foreign_process_stops_launches_and_preempts() -> None:
    """A foreign process on a lane's GPU blocks new launches and cancels the run as PREEMPTED."""
    clock = FakeClock(at(2026, 11, 5, 3, 0))
    probe = ScriptedProbe("GPU-a", "GPU-b")
    metrics = Metrics()
    config = SchedulerConfig(timezone="Europe/Berlin", windows=NIGHTS, idle=IdleConfig(preempt=True))
    scheduler = Scheduler(config, clock, probe, on_window_open=lambda w: None, metrics=metrics)
    cancel = Cancel()
    scheduler.attach_run("GPU-a", cancel)
    probe.pids["GPU-a"] = [999]
    availability = scheduler.poll_gpus()
    assert not availability["GPU-a"].may_launch
    assert availability["GPU-a"].foreign_pids == (999,)
    assert availability["GPU-b"].may_launch
    assert cancel.reason is RunStatus.PREEMPTED
    assert metrics.registry.get_sample_value("autoresearch_foreign_gpu_processes", {"gpu": "GPU-a"}) == 1


def test_foreign_process_without_preempt_lets_the_run_finish() -> None:
    """With preempt = false the running experiment is left alone, but no new launch is allowed."""
    clock = FakeClock(at(2026, 11, 5, 3, 0))
    probe = ScriptedProbe("GPU-a")
    scheduler, _, _ = make_scheduler(clock, probe, NIGHTS, preempt=False)
    cancel = Cancel()
    scheduler.attach_run("GPU-a", cancel)
    probe.pids["GPU-a"] = [999]
    assert not scheduler.poll_gpus()["GPU-a"].may_launch
    assert cancel.reason is None


def test_run_attached_while_foreign_job_present_is_preempted_at_once() -> None:
    """Attaching a run to a GPU that already hosts a foreign job cancels it immediately."""
    clock = FakeClock(at(2026, 11, 5, 3, 0))
    probe = ScriptedProbe("GPU-a")
    scheduler, _, _ = make_scheduler(clock, probe, NIGHTS, preempt=True)
    probe.pids["GPU-a"] = [999]
    scheduler.poll_gpus()
    cancel = Cancel()
    scheduler.attach_run("GPU-a", cancel)
    assert cancel.reason is RunStatus.PREEMPTED


def test_harvested_gpu_is_released_by_a_foreign_job_and_must_idle_again() -> None:
    """A harvested GPU loses its place when a foreign job appears and rejoins only after a new idle streak."""
    clock = FakeClock(at(2026, 11, 4, 15, 0))
    probe = ScriptedProbe("GPU-a")
    scheduler, _, joined = make_scheduler(clock, probe, enabled=True, minutes=5)
    scheduler.poll_gpus()
    clock.sleep(300)
    assert scheduler.poll_gpus()["GPU-a"].harvested
    probe.pids["GPU-a"] = [999]
    assert not scheduler.poll_gpus()["GPU-a"].harvested
    probe.pids["GPU-a"] = []
    clock.sleep(60)
    assert not scheduler.poll_gpus()["GPU-a"].may_launch
    clock.sleep(300)
    assert scheduler.poll_gpus()["GPU-a"].may_launch
    assert joined == ["GPU-a", "GPU-a"]


def test_our_busy_gpu_stays_harvested() -> None:
    """High utilization from our own experiment does not end a harvest."""
    clock = FakeClock(at(2026, 11, 4, 15, 0))
    probe = ScriptedProbe("GPU-a")
    scheduler, _, _ = make_scheduler(clock, probe, enabled=True, minutes=5)
    scheduler.poll_gpus()
    clock.sleep(300)
    scheduler.poll_gpus()
    probe.devices["GPU-a"].utilization = 99
    probe.pids["GPU-a"] = [4242]
    assert scheduler.poll_gpus()["GPU-a"].may_launch


def test_vanished_gpu_may_not_launch() -> None:
    """A lane GPU that NVML stops listing is reported unseen and blocked."""
    clock = FakeClock(at(2026, 11, 5, 3, 0))
    probe = ScriptedProbe("GPU-a")
    scheduler, _, _ = make_scheduler(clock, probe, NIGHTS)
    assert scheduler.poll_gpus()["GPU-a"].may_launch
    del probe.devices["GPU-a"]
    availability = scheduler.poll_gpus()["GPU-a"]
    assert not availability.seen and not availability.may_launch
