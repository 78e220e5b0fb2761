"""`autoresearch run`: the foreground daemon. The scheduler opens windows; each window is one session.

Between windows the process idles (heartbeat, watchdog) until the next one opens or an idle GPU
joins. SIGTERM ends the daemon: the running session finishes its experiments within the grace
period (a second SIGTERM kills them, recorded `interrupted`); nothing is lost either way.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from daemon.config import Settings
from daemon.ops.http import Heartbeat
from daemon.ops.logs import get_logger
from daemon.research import ResearchSession
from daemon.research.stop import StopCondition
from daemon.service.housekeeping import prune_after_session
from daemon.service.notify import SystemdNotifier
from daemon.service.retesting import retest_session, window_reserve
from daemon.service.runtime import Runtime, open_runtime
from daemon.service.scheduler import Scheduler, SystemClock, Window

log = get_logger("autoresearch.service")
STOP_RECORD_S = 60.0  # after the stop grace: record the runs, close the store (the unit's TimeoutStopSec = grace + 60)


def loop_alive(heartbeat: Heartbeat, watchdog_interval_s: float | None) -> bool:
    """The watchdog's rule: the main loop beat within half of WatchdogSec (the ping interval), so a hung
    loop is caught by systemd within WatchdogSec, not only after the (longer) /healthz limit."""
    age = heartbeat.age()
    if age is None:
        return False
    return age <= (watchdog_interval_s if watchdog_interval_s is not None else heartbeat.max_age_s)


@dataclass(frozen=True)
class _Trigger:
    kind: str  # window | idle
    window: Window | None = None


class Service:
    """Turns scheduler events into research sessions, one at a time."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.clock = SystemClock()
        self.triggers: queue.Queue[_Trigger] = queue.Queue()
        self.shutdown = threading.Event()
        self.notifier = SystemdNotifier.from_environ()
        self.current_stop: StopCondition | None = None
        self.orphans = runtime.reconciled.interrupted  # redone once, by the first session
        self._signal_r, write = os.pipe()  # on_signal -> _relay_signals (see on_signal)
        os.set_blocking(write, False)
        self._signal_w: int | None = write
        gpu_uuids = [lane.gpu_uuid for lane in runtime.lanes if lane.gpu_uuid is not None]
        self.scheduler = Scheduler(
            self.settings.scheduler, self.clock, runtime.probe,
            on_window_open=lambda window: self.triggers.put(_Trigger("window", window)),
            on_gpu_joined=lambda uuid: self.triggers.put(_Trigger("idle")),
            # Our own sandboxes' processes on a GPU must not count as a foreign job.
            own_pids=runtime.backend.active_pids,
            gpu_uuids=gpu_uuids or None, metrics=runtime.metrics)

    def on_signal(self, signum: int, _frame: object) -> None:
        """The SIGTERM/SIGINT handler: only hands the signal to the relay thread (`_relay_signals`).

        A Python signal handler runs in the main thread between two bytecodes of whatever it interrupted, so it
        must take no lock that code may hold: the trigger queue's mutex, the shutdown event's condition, the
        stop condition's lock. (Taking them here did deadlock the daemon: a second SIGTERM interrupted the first
        one's `Queue.put` inside its mutex, and the process then ignored every signal but SIGKILL.) A write to
        a non-blocking pipe takes none; a full pipe already holds enough wake-ups."""
        fd = self._signal_w
        if fd is None:
            return
        with contextlib.suppress(OSError):  # BlockingIOError (a full pipe) among them
            os.write(fd, bytes([signum]))

    def _relay_signals(self) -> None:
        """Reads the signals `on_signal` wrote and handles each in this ordinary thread, in order; a 0 byte ends it."""
        while True:
            try:
                received = os.read(self._signal_r, 64)
            except OSError:
                return
            for signum in received:
                if signum == 0:
                    return
                self._handle_signal(signum)
            if not received:
                return

    def close(self) -> None:
        """Closes the signal pipe (after the handlers are restored: a handler writes to it)."""
        fd, self._signal_w = self._signal_w, None
        if fd is not None:
            os.close(fd)
            os.close(self._signal_r)

    def _handle_signal(self, signum: int) -> None:
        if not self.shutdown.is_set():  # STOPPING=1 at once: systemd shows "deactivating" during the grace
            self.notifier.stopping(f"{signal.Signals(signum).name}: finishing the running experiments "
                                   f"(grace {self.settings.scheduler.grace_s:g} s)")
            # The grace, plus time to record the runs, even where TimeoutStopSec was left shorter.
            self.notifier.extend_timeout(self.settings.scheduler.grace_s + STOP_RECORD_S)
        self.shutdown.set()
        stop = self.current_stop
        if stop is not None:
            stop.signal(signal.Signals(signum).name)
        self.triggers.put(_Trigger("shutdown"))

    def _watch_lock(self) -> None:
        """Stop like on SIGTERM if the daemon lock is lost to another daemon (after a database outage)."""
        lock = self.runtime.lock
        if lock is None:
            return
        while not self.shutdown.is_set():
            if lock.lost.wait(timeout=1.0):
                log.error("the daemon lock went to another daemon: stopping this one")
                self.shutdown.set()
                stop = self.current_stop
                if stop is not None:  # the runs now belong to the lock's new holder: end ours at once
                    stop.request_kill("daemon lock lost to another daemon")
                self.triggers.put(_Trigger("shutdown"))
                return

    def serve(self) -> int:
        notifier = self.notifier
        relay = threading.Thread(target=self._relay_signals, name="signal-relay", daemon=True)
        relay.start()
        threading.Thread(target=self._watch_lock, name="lock-watch", daemon=True).start()
        self.scheduler.start()
        upcoming = self.scheduler.next_window()
        self.runtime.live.set_window(None, upcoming)
        notifier.ready("waiting for a window")
        log.info("daemon ready", lanes=[lane.name for lane in self.runtime.lanes],
                 next_window=upcoming.start.isoformat() if upcoming is not None else None)
        self.runtime.heartbeat.beat()
        watchdog = notifier.start_watchdog(
            lambda: loop_alive(self.runtime.heartbeat, notifier.watchdog_interval_s))
        try:
            while not self.shutdown.is_set():
                self.runtime.heartbeat.beat()
                try:
                    trigger = self.triggers.get(timeout=1.0)
                except queue.Empty:
                    continue
                if trigger.kind == "shutdown" or self.shutdown.is_set():
                    break  # a signal came while waiting: open no session just to end it
                self._run_session(trigger, notifier)
        finally:
            notifier.stopping("shutting down")
            watchdog.stop()
            self.scheduler.shutdown()
            if self._signal_w is not None:
                with contextlib.suppress(OSError):
                    os.write(self._signal_w, b"\0")  # the relay's end (signals from now on find no session)
                relay.join(timeout=5.0)
        return 0

    def _run_session(self, trigger: _Trigger, notifier: SystemdNotifier) -> None:
        now: datetime = self.clock.now()
        remaining = trigger.window.remaining(now).total_seconds() if trigger.window is not None else None
        stop = StopCondition(deadline=None if remaining is None else time.monotonic() + remaining,
                             grace_s=self.settings.scheduler.grace_s)
        self.current_stop = stop
        if self.shutdown.is_set():
            stop.signal("shutdown signal")  # it came before `current_stop` was set
        runtime = self.runtime
        runtime.live.set_window(trigger.window, self.scheduler.next_window())
        session = ResearchSession(
            settings=self.settings, store=runtime.store, workspace=runtime.workspace, runner=runtime.runner,
            agent=runtime.agent, lanes=runtime.lanes, owner=runtime.owner, metrics=runtime.metrics,
            heartbeat=runtime.heartbeat, gate=self.scheduler, trigger=trigger.kind,
            cost_since=trigger.window.start if trigger.window is not None else now, live=runtime.live)
        # The daemon adopts the session its crashed predecessor left open, and so ends it.
        record = session.open(orphans=self.orphans, adopt=True)
        self.orphans = ()
        # A window keeps its last part for the morning re-test (daemon.research.retest); an idle harvest has no end.
        retest = self.settings.retest.enabled and trigger.window is not None and remaining is not None
        if retest and remaining is not None:
            stop.reserve = window_reserve(runtime, record.id, remaining)
        notifier.status(f"session {record.id} running")
        try:
            try:
                summary = session.run(stop)
            except BaseException:
                runtime.metrics.session_ended("failed")  # the session recorded itself `failed` and re-raised
                raise
            runtime.metrics.session_ended(summary.status)
            log.info("session done", session=summary.session_id, reason=summary.stop_reason, status=summary.status)
            if retest and not stop.signalled():
                notifier.status(f"session {record.id}: re-testing the night on fresh seeds")
                retest_session(runtime, summary.session_id, stop)
            if self.settings.report.on_session_end:
                from daemon.ops.morning import finish_session

                finish_session(runtime.store, runtime.workspace.reports_dir, summary, self.settings.report)
            prune_after_session(self.settings, runtime.workspace.runs_dir,  # between sessions: no run is active
                                docker_backend=runtime.backend.name == "docker")
        finally:
            self.current_stop = None
            runtime.metrics.window(False)
            runtime.live.set_window(None, self.scheduler.next_window())
            notifier.status("waiting for a window")


def serve(settings: Settings) -> int:
    # Migrations, reconciliation and a database still starting may outlast TimeoutStartSec: extend it meanwhile.
    with SystemdNotifier.from_environ().extending_start("starting: database, migrations, reconciliation"):
        runtime = open_runtime(settings, daemon=True)
    service = Service(runtime)
    previous = {sig: signal.signal(sig, service.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return service.serve()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        service.close()
        runtime.close()
