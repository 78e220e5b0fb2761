"""When a research session stops launching, and when its running experiments must be killed.

One object answers both questions for every lane. Reasons to stop launching: the window ended (or its
last part, `reserve`, which the driver keeps for the morning re-test: `daemon.research.retest`), a
signal (SIGTERM/SIGINT), the cost cap, too many crashes in a row, the experiment count, a fatal error.
Running experiments may finish within `grace_s` after the stop; then (or at once on a second signal)
they are killed and recorded `interrupted`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class StopCondition:
    deadline: float | None = None  # monotonic time the window ends; None = no window end
    grace_s: float = 600.0
    monotonic: Callable[[], float] = time.monotonic
    reserve: Callable[[], float] | None = None  # seconds before the deadline kept free of new experiments
    _reason: str | None = field(default=None, init=False)
    _kill_at: float | None = field(default=None, init=False)
    _signals: int = field(default=0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _changed: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    @classmethod
    def for_duration(cls, seconds: float | None, grace_s: float,
                     monotonic: Callable[[], float] = time.monotonic) -> StopCondition:
        """A stop at `seconds` from now (None: only explicit stops)."""
        deadline = None if seconds is None else monotonic() + seconds
        return cls(deadline=deadline, grace_s=grace_s, monotonic=monotonic)

    def request_stop(self, reason: str) -> None:
        """Launch nothing new; running experiments get `grace_s` to finish. The first reason wins."""
        with self._lock:
            if self._reason is None:
                self._reason = reason
                self._kill_at = self.monotonic() + self.grace_s
        self._changed.set()

    def request_kill(self, reason: str) -> None:
        """Launch nothing new and kill running experiments now."""
        with self._lock:
            if self._reason is None:
                self._reason = reason
            self._kill_at = self.monotonic()
        self._changed.set()

    def signal(self, name: str = "SIGTERM") -> None:
        """A termination signal: the first finishes current work within the grace period, the second kills."""
        with self._lock:
            self._signals += 1
            second = self._signals > 1
        if second:
            self.request_kill(f"second {name}: killing running experiments")
        else:
            self.request_stop(f"{name}: finishing current experiments (grace {self.grace_s:g} s)")

    def signalled(self) -> bool:
        """True once a termination signal was received (the session ends `interrupted`)."""
        with self._lock:
            return self._signals > 0

    def reason(self) -> str | None:
        """Why no new experiment may start, or None while launching is allowed."""
        with self._lock:
            if self._reason is not None:
                return self._reason
        if self.deadline is not None:
            reserved = max(self.reserve(), 0.0) if self.reserve is not None else 0.0
            if self.monotonic() >= self.deadline - reserved:
                return "window ended" + (f" (its last {reserved:.0f} s are kept for the re-test)" if reserved else "")
        return None

    def time_left(self) -> float | None:
        """Seconds until the window's end (the deadline itself, not the reserve); None without a window."""
        return None if self.deadline is None else self.deadline - self.monotonic()

    def kill_due(self) -> bool:
        """True once running experiments must be killed (grace over, or a kill was requested)."""
        now = self.monotonic()
        with self._lock:
            if self._kill_at is not None and now >= self._kill_at:
                return True
        return self.deadline is not None and now >= self.deadline + self.grace_s

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early when a stop or kill is requested; True if one was."""
        woke = self._changed.wait(seconds)
        self._changed.clear()
        return woke or self.reason() is not None
