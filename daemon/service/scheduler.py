"""When the daemon may use which GPU: cron windows (nights, weekends) and idle-GPU harvesting.

The database is the source of truth for the research itself; this module only *opens* windows and
says which GPUs may take a new launch. Wiring, in the `run` command:

    scheduler = Scheduler(settings.scheduler, SystemClock(), probe, on_window_open=loop.open_window,
                          on_gpu_joined=loop.gpu_joined, own_pids=sandbox_pids, gpu_uuids=lane_uuids,
                          metrics=metrics)
    scheduler.start()            # a daemon started mid-window joins it at once (on_window_open is called)
    ... scheduler.may_launch(uuid) before each launch on a lane ...
    scheduler.attach_run(uuid, cancel); ...; scheduler.detach_run(uuid)   # around each sandbox run
    scheduler.shutdown()

Callbacks run on APScheduler's worker thread: hand the work over to the loop (a queue, an event).
`on_window_open(window)` may be called again with a later `end` while a window is open (overlapping
windows): treat it as an extension. Window durations are elapsed time: a 9-hour night across a DST
change still lasts 9 hours; the start follows the local wall clock of `scheduler.timezone`.

Idle harvesting (`[scheduler.idle] enabled = true`): a GPU that shows no foreign compute process and
utilization below the threshold on every poll for `minutes` joins (`on_gpu_joined(uuid)`) and stays
joined until a foreign process appears. A foreign process on a lane's GPU always stops new launches
there; with `preempt = true` it also cancels the running experiment with `RunStatus.PREEMPTED`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from daemon.clock import Clock as Clock  # re-exported: the time seam
from daemon.clock import SystemClock as SystemClock
from daemon.config import SchedulerConfig, WindowConfig
from daemon.ops.logs import get_logger
from sandbox.gpu import GpuProbe, foreign_pids
from sandbox.spec import Cancel, RunStatus

if TYPE_CHECKING:
    from daemon.ops.metrics import Metrics

log = get_logger("autoresearch.scheduler")

GPU_POLL_JOB_ID = "gpu-poll"
UTC = timezone.utc
_TICK = timedelta(microseconds=1)


@dataclass(frozen=True)
class Window:
    """One open research window (aware datetimes in the scheduler's time zone)."""

    name: str
    start: datetime
    end: datetime

    def remaining(self, now: datetime) -> timedelta:
        # In UTC: subtracting two datetimes of the same zone gives wall-clock time, wrong across DST.
        return max(self.end.astimezone(UTC) - now.astimezone(UTC), timedelta(0))


def window_job_id(index: int, window: WindowConfig) -> str:
    """Stable across restarts and config reloads as long as the window keeps its name (or position)."""
    return f"window:{window.name}" if window.name else f"window:{index}"


def _trigger(window: WindowConfig, zone: ZoneInfo) -> CronTrigger:
    return CronTrigger.from_crontab(window.cron, timezone=zone)


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"naive datetime {now.isoformat()}: pass an aware datetime (Clock.now() must be aware)")


def _latest_fire_in(trigger: CronTrigger, after: datetime, until: datetime) -> datetime | None:
    """The latest fire time in (after, until], found by bisection (a minutely cron over a week is 10k fires)."""
    # APScheduler rounds a start with microseconds up to the next whole second, so +1 µs makes `after` exclusive.
    first = trigger.get_next_fire_time(None, after + _TICK)
    if first is None or first > until:
        return None
    # Invariant: the next fire at/after `lo` is <= until; the next fire at/after `hi` is > until (or none).
    lo, hi = first, until + timedelta(seconds=1)
    while hi - lo > timedelta(seconds=1):
        mid = lo + (hi - lo) / 2
        fire = trigger.get_next_fire_time(None, mid)
        if fire is not None and fire <= until:
            lo = fire
        else:
            hi = mid
    return lo


def current_window(windows: Sequence[WindowConfig], timezone: str, now: datetime) -> Window | None:
    """The open window at `now` (the one ending last when several overlap), or None.

    A window is open from a cron fire time for its duration; so a daemon started at 03:00 inside a
    22:00 + 9 h night gets the window 22:00..07:00 and works for the remaining four hours.
    """
    _require_aware(now)
    zone = ZoneInfo(timezone)
    now_utc = now.astimezone(UTC)
    best: Window | None = None
    for index, config in enumerate(windows):
        fire = _latest_fire_in(_trigger(config, zone), now_utc - config.duration, now_utc)
        if fire is None:
            continue
        start = fire.astimezone(zone)
        end = (fire.astimezone(UTC) + config.duration).astimezone(zone)
        if best is None or end > best.end:
            best = Window(config.name or f"window {index}", start, end)
    return best


def next_window(windows: Sequence[WindowConfig], timezone: str, now: datetime) -> Window | None:
    """The next window to open strictly after `now`, or None when no window is configured."""
    _require_aware(now)
    zone = ZoneInfo(timezone)
    soonest: Window | None = None
    for index, config in enumerate(windows):
        fire = _trigger(config, zone).get_next_fire_time(None, now.astimezone(zone) + _TICK)
        if fire is None:
            continue
        candidate = Window(config.name or f"window {index}", fire.astimezone(zone),
                           (fire.astimezone(UTC) + config.duration).astimezone(zone))
        if soonest is None or candidate.start < soonest.start:
            soonest = candidate
    return soonest


@dataclass(frozen=True)
class GpuAvailability:
    """What the scheduler knows about one lane GPU after the last poll."""

    uuid: str
    in_window: bool
    harvested: bool  # joined through idle harvesting
    foreign_pids: tuple[int, ...] = ()
    utilization: float | None = None
    idle_since: datetime | None = None
    seen: bool = True  # False when the probe no longer lists this GPU

    @property
    def may_launch(self) -> bool:
        return self.seen and (self.in_window or self.harvested) and not self.foreign_pids


@dataclass
class _GpuState:
    foreign_pids: tuple[int, ...] = ()
    utilization: float | None = None
    idle_since: datetime | None = None
    harvested: bool = False
    seen: bool = False
    cancel: Cancel | None = field(default=None, repr=False)


class Scheduler:
    """Opens windows on their cron schedule and tracks which lane GPUs may take new launches."""

    def __init__(
        self,
        config: SchedulerConfig,
        clock: Clock,
        probe: GpuProbe,
        *,
        on_window_open: Callable[[Window], None],
        on_gpu_joined: Callable[[str], None] | None = None,
        own_pids: Callable[[], Collection[int]] = frozenset,
        gpu_uuids: Sequence[str] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.probe = probe
        self._on_window_open = on_window_open
        self._on_gpu_joined = on_gpu_joined
        self._own_pids = own_pids
        self._metrics = metrics
        self._zone = ZoneInfo(config.timezone)
        self._lock = threading.Lock()
        self._gpus: dict[str, _GpuState] = {uuid: _GpuState() for uuid in (gpu_uuids or ())}
        self._fixed_lanes = gpu_uuids is not None
        self._aps: BackgroundScheduler | None = None

    # -- windows ---------------------------------------------------------------------------------

    def current_window(self, now: datetime | None = None) -> Window | None:
        return current_window(self.config.windows, self.config.timezone, now or self.clock.now())

    def next_window(self, now: datetime | None = None) -> Window | None:
        return next_window(self.config.windows, self.config.timezone, now or self.clock.now())

    def _open_current_window(self) -> None:
        window = self.current_window()
        if window is None:
            # A fire that arrives after its window already ended (a very late misfire): nothing to open.
            log.info("window trigger fired but no window is open now")
            return
        log.info("window open", window=window.name, start=window.start.isoformat(), end=window.end.isoformat())
        if self._metrics is not None:
            self._metrics.window(True, window.start, window.end)
        self._on_window_open(window)

    def start(self) -> Window | None:
        """Schedule every window (and GPU polling); join the window open right now, if any, and return it."""
        if self._aps is not None:
            raise RuntimeError("Scheduler.start() called twice; call shutdown() first")
        aps = BackgroundScheduler(timezone=self._zone, daemon=True)
        for index, config in enumerate(self.config.windows):
            aps.add_job(
                self._open_current_window,
                _trigger(config, self._zone),
                id=window_job_id(index, config),
                name=f"open {config.name or config.cron} for {config.hours:g} h",
                # Joining late still makes sense for the rest of the window.
                misfire_grace_time=max(int(config.duration.total_seconds()), 1),
                coalesce=True,
                max_instances=1,
                replace_existing=True,
            )
        aps.add_job(
            self._poll_job,
            "interval",
            seconds=self.config.idle.poll_seconds,
            id=GPU_POLL_JOB_ID,
            name="poll GPUs for foreign processes and idleness",
            misfire_grace_time=max(int(self.config.idle.poll_seconds), 1),
            coalesce=True,
            max_instances=1,
            replace_existing=True,
        )
        aps.start()
        self._aps = aps
        self.poll_gpus()
        window = self.current_window()
        if window is not None:
            log.info("started inside a window; joining it for the remaining time",
                     window=window.name, remaining_s=int(window.remaining(self.clock.now()).total_seconds()))
            self._open_current_window()
        elif (upcoming := self.next_window()) is not None:
            log.info("no window open", next_window=upcoming.name, opens=upcoming.start.isoformat())
        return window

    def shutdown(self) -> None:
        if self._aps is not None:
            self._aps.shutdown(wait=False)
            self._aps = None

    @property
    def jobs(self) -> BackgroundScheduler | None:
        """The underlying APScheduler (for inspection), None before `start()`."""
        return self._aps

    # -- GPUs ----------------------------------------------------------------------------------

    def attach_run(self, gpu_uuid: str, cancel: Cancel) -> None:
        """The lane on this GPU started a sandbox run; a foreign job may preempt it through `cancel`."""
        with self._lock:
            state = self._gpus.setdefault(gpu_uuid, _GpuState())
            state.cancel = cancel
            preempt_now = bool(state.foreign_pids) and self.config.idle.preempt
        if preempt_now:
            cancel.set(RunStatus.PREEMPTED)

    def detach_run(self, gpu_uuid: str) -> None:
        with self._lock:
            if gpu_uuid in self._gpus:
                self._gpus[gpu_uuid].cancel = None

    def _poll_job(self) -> None:
        try:
            self.poll_gpus()
        except Exception as exc:  # NVML hiccups must not kill the polling job
            log.warning("GPU poll failed", error=f"{type(exc).__name__}: {exc}")

    def poll_gpus(self) -> dict[str, GpuAvailability]:
        """One look at every lane GPU: foreign processes, utilization, idle streaks, preemption."""
        now = self.clock.now()
        infos = {info.uuid: info for info in self.probe.gpus()}
        joined: list[str] = []
        to_preempt: list[tuple[str, Cancel]] = []
        idle = self.config.idle
        with self._lock:
            if not self._fixed_lanes:
                for uuid in infos:
                    self._gpus.setdefault(uuid, _GpuState())
            for uuid, state in self._gpus.items():
                info = infos.get(uuid)
                state.seen = info is not None
                if info is None:
                    state.idle_since, state.harvested = None, False
                    continue
                pids = tuple(foreign_pids(self.probe, uuid, self._own_pids))
                appeared = bool(pids) and not state.foreign_pids
                state.foreign_pids = pids
                state.utilization = info.utilization
                if pids:
                    if appeared:
                        log.warning("foreign GPU process; no new launches on this GPU", gpu=uuid, pids=list(pids),
                                    preempt=idle.preempt)
                    state.idle_since, state.harvested = None, False
                    if idle.preempt and state.cancel is not None and state.cancel.reason is None:
                        to_preempt.append((uuid, state.cancel))
                elif idle.enabled and not state.harvested:
                    if info.utilization < idle.utilization_below:
                        state.idle_since = state.idle_since or now
                        if now - state.idle_since >= timedelta(minutes=idle.minutes):
                            state.harvested = True
                            joined.append(uuid)
                    else:
                        state.idle_since = None
                if self._metrics is not None:
                    self._metrics.foreign_processes(uuid, len(pids))
            snapshot = self._snapshot(now)
        for uuid, cancel in to_preempt:
            log.warning("preempting the running experiment for a foreign job", gpu=uuid)
            cancel.set(RunStatus.PREEMPTED)
        for uuid in joined:
            log.info("idle GPU joins", gpu=uuid, idle_minutes=idle.minutes)
            if self._on_gpu_joined is not None:
                self._on_gpu_joined(uuid)
        return snapshot

    def _snapshot(self, now: datetime) -> dict[str, GpuAvailability]:
        in_window = self.current_window(now) is not None
        return {
            uuid: GpuAvailability(uuid, in_window, state.harvested, state.foreign_pids, state.utilization,
                                  state.idle_since, state.seen)
            for uuid, state in self._gpus.items()
        }

    def gpu_availability(self) -> dict[str, GpuAvailability]:
        """The state after the last poll, with the window evaluated now."""
        with self._lock:
            return self._snapshot(self.clock.now())

    def may_launch(self, gpu_uuid: str) -> bool:
        """True when a new experiment may start on this GPU now (window or harvested, and no foreign job)."""
        availability = self.gpu_availability().get(gpu_uuid)
        return availability is not None and availability.may_launch
