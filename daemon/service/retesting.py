"""The morning re-test wired to a runtime: for the daemon's windows (`serve`) and `autoresearch retest`.

`make_retest` builds `daemon.research.retest.Retest` from the runtime's store and runner (and, with the
transfer check on, a second runner at the longer budget); `window_reserve` is the stop condition's reserve
for a session; `retest_session` runs the re-test and publishes its two gauges. A failing re-test is logged
and never takes the daemon down: the report then says no re-test ran.
"""

from __future__ import annotations

from collections.abc import Callable

from daemon.ops.logs import get_logger
from daemon.research.retest import (
    CachedReserve,
    Clock,
    Comparison,
    Retest,
    held_ratio,
    keep_results,
    kept_changes,
    night_result,
    reserve_seconds,
)
from daemon.service.runtime import Runtime, make_runner

log = get_logger("autoresearch.retest")


def make_retest(runtime: Runtime) -> Retest:
    settings = runtime.settings
    transfer = None
    if settings.retest.transfer:
        longer = settings.model_copy(deep=True)
        longer.training.time_budget_s = settings.training.time_budget_s * settings.retest.transfer_budget_factor
        transfer = make_runner(longer, runtime.backend, runtime.workspace, runtime.probe, runtime.store)
    gpu = runtime.lanes[0].gpu_uuid if runtime.lanes else None
    return Retest(store=runtime.store, runner=runtime.runner, config=settings.retest,
                  budget_s=settings.training.time_budget_s, gpu_uuid=gpu, transfer_runner=transfer,
                  heartbeat=runtime.heartbeat)


WINDOW_SHARE = 0.5  # the re-test never takes more than this share of a window


def window_reserve(runtime: Runtime, session_id: int, window_s: float) -> Callable[[], float]:
    """The seconds a window keeps free at its end for the re-test (re-read as the night's runs are timed):
    none before a change is kept, never more than half the window."""
    settings = runtime.settings
    return CachedReserve(lambda: reserve_seconds(runtime.store, session_id, settings.retest,
                                                 settings.training.time_budget_s, cap_s=WINDOW_SHARE * window_s))


def publish(runtime: Runtime, session_id: int, found: list[Comparison]) -> None:
    night = night_result(found)
    if night is not None and night.delta is not None:
        runtime.metrics.retest_gain(night.delta)
    ratio = held_ratio(keep_results(found, kept_changes(runtime.store, session_id)))
    if ratio is not None:
        runtime.metrics.keeps_held(ratio)


def retest_session(runtime: Runtime, session_id: int, clock: Clock, *, write_results: bool = True) -> list[Comparison]:
    """Run the session's re-test within `clock`'s window; [] if it failed (logged). With `write_results`, the
    workspace's results.tsv is rewritten with the re-test's rows (only for the workspace's current session)."""
    try:
        found = make_retest(runtime).run(session_id, clock)
        if write_results:
            runtime.workspace.write_results(runtime.store.results_tsv(session_id))
    except Exception as exc:  # the re-test must not stop the daemon; the report says none ran
        log.error("re-test failed", session=session_id, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        return []
    publish(runtime, session_id, found)
    return found
