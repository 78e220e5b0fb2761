"""systemd `Type=notify` support without depending on systemd: READY, STOPPING, WATCHDOG, STATUS.

systemd passes a datagram socket in `NOTIFY_SOCKET` (a path, or an abstract name starting with '@')
and, with `WatchdogSec=`, the deadline in `WATCHDOG_USEC` (plus `WATCHDOG_PID`, the process it is
meant for). Without `NOTIFY_SOCKET` (a terminal, tests, containers) every call is a no-op.

    notifier = SystemdNotifier.from_environ()
    with notifier.extending_start("migrating, reconciling"):   # EXTEND_TIMEOUT_USEC while start-up is slow
        runtime = open_runtime(...)
    notifier.ready("window closed; next at 22:00")
    watchdog = notifier.start_watchdog(alive=heartbeat.fresh)    # pings only while the loop is alive
    ...
    notifier.stopping(); notifier.extend_timeout(grace_s + 60)      # SIGTERM: the stop grace may outlast TimeoutStopSec
    watchdog.stop()

EXTEND_TIMEOUT_USEC (systemd >= 236) pushes the start or stop timeout to "now + usec" when that is later.
Start-up extends in steps while it makes progress, with a ceiling (`max_total_s`): a start-up that hangs
still hits a timeout, only later than TimeoutStartSec.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from daemon.errors import ConfigError
from daemon.ops.logs import get_logger

log = get_logger("autoresearch.notify")

_HINT = "this variable is set by systemd; unset it when not running under a Type=notify unit"


def _socket_address(value: str) -> str | bytes:
    if value.startswith("@"):
        # Abstract namespace: the kernel name starts with a NUL byte instead of '@'.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise ConfigError(f"NOTIFY_SOCKET={value!r} is neither a socket path nor an abstract name ('@...')", hint=_HINT)


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    usec_text = environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text and pid_text.strip() != str(os.getpid()):
        return None  # the watchdog belongs to another process (e.g. our parent)
    try:
        usec = int(usec_text)
    except ValueError:
        raise ConfigError(f"WATCHDOG_USEC={usec_text!r} is not a whole number of microseconds", hint=_HINT) from None
    if usec <= 0:
        raise ConfigError(f"WATCHDOG_USEC={usec_text!r} must be positive", hint=_HINT)
    # systemd's advice: ping at half the deadline so one late ping does not kill the service.
    return usec / 1e6 / 2


class SystemdNotifier:
    """Sends sd_notify messages; `enabled` is False (and every call a no-op) outside systemd."""

    def __init__(self, address: str | bytes | None, watchdog_interval_s: float | None = None) -> None:
        self.address = address
        self.watchdog_interval_s = watchdog_interval_s if address is not None else None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        """Read NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID; bad values raise `ConfigError`."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = _socket_address(raw) if raw else None
        return cls(address, _watchdog_interval(env) if address is not None else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send `KEY=value` lines as one datagram; False when disabled or systemd is gone (logged)."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            # A vanished manager must not stop the research; the watchdog will say if it matters.
            log.warning("sd_notify failed", error=str(exc), message=message.decode(errors="replace"))
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: systemd's current start/stop timeout ends no earlier than `seconds` from now."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(int(seconds * 1e6), 1)}")

    @contextlib.contextmanager
    def extending_start(self, status: str, step_s: float = 90.0, max_total_s: float = 3600.0,
                        monotonic: Callable[[], float] = time.monotonic) -> Iterator[None]:
        """While the block runs (migrations, reconciliation, waiting for the database), keep pushing the
        start timeout `step_s` ahead, every `step_s / 3`, for at most `max_total_s` in all."""
        if self.address is None:
            yield
            return
        self.status(status)
        done = threading.Event()
        deadline = monotonic() + max_total_s

        def extend() -> None:
            while True:
                left = deadline - monotonic()
                if left <= 0:
                    log.warning("start-up still running; no more timeout extensions", limit_s=max_total_s)
                    return
                self.extend_timeout(min(step_s, left))
                if done.wait(step_s / 3):
                    return

        thread = threading.Thread(target=extend, name="autoresearch-extend-start", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(timeout=5)

    def start_watchdog(self, alive: Callable[[], bool]) -> WatchdogPinger:
        """Ping WATCHDOG=1 every half deadline while `alive()` is true (a hung loop gets restarted)."""
        return WatchdogPinger(self, alive)


def _one_line(text: str) -> str:
    # A newline would start a new KEY=value field in the datagram.
    return " ".join(text.split())


class WatchdogPinger:
    """Background thread of `SystemdNotifier.start_watchdog`; does nothing when no watchdog is configured."""

    def __init__(self, notifier: SystemdNotifier, alive: Callable[[], bool]) -> None:
        self._notifier = notifier
        self._alive = alive
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if notifier.watchdog_interval_s is not None:
            self._thread = threading.Thread(target=self._run, name="autoresearch-watchdog", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        interval = self._notifier.watchdog_interval_s
        assert interval is not None
        while True:
            if self._alive():
                self._notifier.watchdog()
            else:
                log.warning("research loop not alive; withholding the watchdog ping")
            if self._stop.wait(interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
