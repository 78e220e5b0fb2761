"""Faults around the research loop, in-process on real Postgres with real tiny training in the local sandbox.

Window end mid-experiment, work cut short and redone by the next session, a foreign GPU process (scripted
probe at the sandbox.gpu seam), a lease taken over by another owner, and the status page during a session.
"""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from daemon.research import ResearchSession
from daemon.research.stop import StopCondition
from daemon.service.runtime import Runtime, open_runtime
from daemon.service.scheduler import Scheduler, SystemClock
from daemon.store.records import SESSION_OPEN, ExperimentRecord
from sandbox.gpu import GpuInfo
from tests.e2e.support import free_port

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
GPU = "GPU-00000000-fake"


def _session(runtime: Runtime, **kwargs: Any) -> ResearchSession:
    return ResearchSession(settings=runtime.settings, store=runtime.store, workspace=runtime.workspace,
                           runner=runtime.runner, agent=runtime.agent, lanes=runtime.lanes, owner=runtime.owner,
                           metrics=runtime.metrics, heartbeat=runtime.heartbeat, live=runtime.live, **kwargs)


def _wait_for(what: str, check: Callable[[], bool], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _running(runtime: Runtime, kind: str) -> ExperimentRecord | None:
    rows = runtime.store.list_experiments(status="running", limit=5, kind=kind)
    return rows[0] if rows else None


def _in_background(work: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(work()), daemon=True)
    thread.start()
    return thread, results


def test_window_end_mid_experiment_kills_it_and_ends_the_session(tiny_settings: Any) -> None:
    """A window ending (grace 0) kills the running experiment, records it `interrupted` and ends the session."""
    runtime = open_runtime(tiny_settings(training={"time_budget_s": 120}), daemon=False)
    try:
        session = _session(runtime, max_experiments=0)
        session.open()
        summary = session.run(StopCondition.for_duration(5, grace_s=0))
        rows = runtime.store.list_experiments(session_id=summary.session_id, limit=10)
        assert [(r.kind, r.status) for r in rows] == [("baseline", "interrupted")]
        assert summary.stop_reason == "window ended"
        ended = runtime.store.get_session(summary.session_id)
        assert ended is not None and ended.status != SESSION_OPEN
    finally:
        runtime.close()


def test_candidate_cut_short_by_a_stop_is_redone_by_the_next_session(tiny_settings: Any) -> None:
    """A candidate killed at a window end is queued again (attempt + 1, same source) in the next window's session."""
    runtime = open_runtime(tiny_settings(), daemon=False)
    try:
        first = _session(runtime, max_experiments=1)
        first.open()
        stop = StopCondition(grace_s=0)
        thread, _ = _in_background(lambda: first.run(stop))
        _wait_for("a running candidate", lambda: _running(runtime, "candidate") is not None, 180)
        cut = _running(runtime, "candidate")
        stop.request_stop("window ended")
        thread.join(120)
        assert cut is not None
        cut_after = runtime.store.get_experiment(cut.id)
        assert cut_after is not None and cut_after.status == "interrupted"

        second = _session(runtime, max_experiments=1)
        record = second.open()
        assert record.id != first.session_id
        second.run(StopCondition(grace_s=60))
        redone = [r for r in runtime.store.list_experiments(session_id=record.id, limit=10) if r.kind == "candidate"]
        assert len(redone) == 1
        assert (redone[0].source, redone[0].source_hash, redone[0].attempt) == (cut.source, cut.source_hash, 2)
        assert redone[0].status not in ("queued", "running", "evaluating", "interrupted")
    finally:
        runtime.close()


class ScriptedGpuProbe:
    """The NVML seam: one GPU whose processes are our sandbox's plus any foreign PIDs the test adds."""

    def __init__(self) -> None:
        self.foreign: set[int] = set()
        self.sandbox_pids: Callable[[], set[int]] = set
        self.memory_used_mb = 100.0

    def gpus(self) -> list[GpuInfo]:
        return [GpuInfo(GPU, 0, "Scripted GPU", memory_used_mb=self.memory_used_mb, memory_total_mb=80_000.0,
                        utilization=0.0)]

    def gpu_pids(self, uuid: str) -> list[int]:
        return sorted(self.sandbox_pids() | self.foreign)


@contextlib.contextmanager
def _scripted_gpu_lane(settings: Any) -> Iterator[tuple[Runtime, ScriptedGpuProbe, Scheduler]]:
    """A runtime with one lane on the scripted GPU, and the real scheduler watching it (polled once)."""
    probe = ScriptedGpuProbe()
    runtime = open_runtime(settings, daemon=False, probe=probe)
    runtime.runner.require_cuda = False  # a scripted GPU on a CPU machine: its lane's stages run on the CPU
    probe.sandbox_pids = runtime.backend.active_pids
    scheduler = Scheduler(settings.scheduler, SystemClock(), probe, on_window_open=lambda _window: None,
                          own_pids=runtime.backend.active_pids, gpu_uuids=[GPU])
    try:
        scheduler.poll_gpus()
        yield runtime, probe, scheduler
    finally:
        scheduler.shutdown()
        runtime.close()


def _window_now() -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    return {"cron": f"{now.minute} {now.hour} * * *", "hours": 1.0, "name": "night"}


def test_foreign_gpu_process_preempts_requeues_and_pauses_launches(tiny_settings: Any) -> None:
    """A foreign process on the lane's GPU preempts the run (re-queued) and no launch follows while it stays."""
    settings = tiny_settings(training={"time_budget_s": 120},
                             scheduler={"windows": [_window_now()], "idle": {"preempt": True, "poll_seconds": 3600}})
    with _scripted_gpu_lane(settings) as (runtime, probe, scheduler):
        assert [lane.gpu_uuid for lane in runtime.lanes] == [GPU]
        session = _session(runtime, max_experiments=0, gate=scheduler)
        session.open()
        stop = StopCondition(grace_s=30)
        thread, _ = _in_background(lambda: session.run(stop))
        _wait_for("the sandbox's processes", lambda: bool(runtime.backend.active_pids()))
        assert scheduler.poll_gpus()[GPU].foreign_pids == (), "our own sandbox must not count as foreign"
        baseline = _running(runtime, "baseline")
        probe.foreign.add(999_999)
        scheduler.poll_gpus()
        _wait_for("the preemption", lambda: baseline is not None and getattr(
            runtime.store.get_experiment(baseline.id), "status", "") == "preempted")
        time.sleep(2.5)  # several launch checks of the lane pass while the foreign process stays
        rows = runtime.store.list_experiments(session_id=session.session_id, limit=10)
        stop.request_stop("test over")
        thread.join(60)
        assert [(r.kind, r.status, r.attempt) for r in rows] == [("baseline", "queued", 2), ("baseline", "preempted", 1)]


def test_stale_owner_cannot_overwrite_the_new_owners_run(tiny_settings: Any) -> None:
    """After our lease expired and another daemon claimed the experiment, our lane changes nothing of it."""
    runtime = open_runtime(tiny_settings(training={"time_budget_s": 30}), daemon=False)
    try:
        session = _session(runtime, max_experiments=0, lease_seconds=60)
        session.open()
        stop = StopCondition(grace_s=120)
        thread, _ = _in_background(lambda: session.run(stop))
        _wait_for("a running baseline", lambda: _running(runtime, "baseline") is not None)
        assert runtime.store.requeue_expired(now=datetime.now(timezone.utc) + timedelta(minutes=5))
        taken = runtime.store.claim_next(session.session_id, "other-daemon:1", "cpu", None, 600)
        assert taken is not None
        stop.request_stop("test over")
        thread.join(120)
        assert not thread.is_alive()
        after = runtime.store.get_experiment(taken.id)
        assert after is not None
        assert (after.status, after.lease_owner, after.attempt, after.val_bpb) == ("running", "other-daemon:1", 2, None)
    finally:
        runtime.close()


def test_status_page_shows_the_running_session(tiny_settings: Any) -> None:
    """GET / of the daemon's HTTP server shows the session, its running experiment and the busy lane."""
    port = free_port()
    runtime = open_runtime(tiny_settings(training={"time_budget_s": 120}, metrics={"port": port}), daemon=False)
    try:
        session = _session(runtime, max_experiments=0)
        record = session.open()
        stop = StopCondition(grace_s=0)
        thread, _ = _in_background(lambda: session.run(stop))
        _wait_for("a running baseline", lambda: _running(runtime, "baseline") is not None)
        baseline = _running(runtime, "baseline")
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        stop.request_kill("test over")
        thread.join(60)
        assert baseline is not None
        assert f"Session {record.id}" in page and record.tag in page
        assert f'data-id="{baseline.id}" data-status="running"' in page
        assert '<tr class="lane running"><td>cpu</td>' in page and f"<td>#{baseline.id}</td>" in page
    finally:
        runtime.close()


def _crash_edit(description: str, exit_code: int) -> dict[str, Any]:
    """A proposal whose train.py exits at import (a fast, cheap experiment)."""
    return {"description": description, "hypothesis": "a quick run",
            "edits": [{"search": "MUON_MOMENTUM = 0.95", "replace": f"MUON_MOMENTUM = 0.95\nraise SystemExit({exit_code})"}]}


def test_duplicate_proposal_is_refused(tiny_settings: Any) -> None:
    """A proposal whose normalized source was already tried in the session never becomes an experiment."""
    from tests.fakes.anthropic_server import FakeAnthropicServer, tool_reply

    with FakeAnthropicServer() as server:
        server.enqueue(tool_reply(_crash_edit("first idea", 3)), tool_reply(_crash_edit("the same idea again", 3)),
                       tool_reply(_crash_edit("second idea", 4)))
        settings = tiny_settings(agent={"provider": "anthropic", "api_key": "test", "base_url": server.url,
                                        "repair_rounds": 0, "max_retries": 0, "retry_backoff_s": 0})
        runtime = open_runtime(settings, daemon=False)
        try:
            session = _session(runtime, max_experiments=2)
            session.open()
            session.run(StopCondition(grace_s=60))
            candidates = sorted((r for r in runtime.store.list_experiments(session_id=session.session_id, limit=20)
                                 if r.kind == "candidate"), key=lambda r: r.id)
        finally:
            runtime.close()
    assert [r.description for r in candidates] == ["first idea", "second idea"]
    assert len({r.source_hash for r in candidates}) == 2 and all(r.source_hash for r in candidates)
    assert len(server.requests) >= 3


@pytest.mark.docker
def test_a_sandbox_that_keeps_failing_ends_the_session(tiny_settings: Any, trainer_image: str) -> None:
    """Runs that fail as infra errors (here: the image vanished) stop the session after 3, not loop forever."""
    import uuid

    import docker

    client = docker.from_env()
    alias = f"autoresearch-trainer:vanishing-{uuid.uuid4().hex[:8]}"
    client.images.get(trainer_image).tag(*alias.split(":"))
    try:
        runtime = open_runtime(tiny_settings(sandbox={"backend": "docker", "image": alias}), daemon=False)
    finally:
        client.images.remove(alias)  # only the alias: the image itself stays
    try:
        session = _session(runtime, max_experiments=2)
        session.open()
        summary = session.run(StopCondition(grace_s=0))
        rows = runtime.store.list_experiments(session_id=summary.session_id, limit=20)
        assert [r.status for r in rows] == ["interrupted"] * 3
        assert summary.status == "failed"
        assert "the sandbox failed 3 runs in a row" in summary.stop_reason
        assert "autoresearch doctor" in summary.stop_reason
    finally:
        runtime.close()
        client.close()


def test_gpu_whose_memory_is_not_released_is_quarantined(tiny_settings: Any) -> None:
    """After a killed run whose GPU memory stays in use, the lane stops launching and the gauge says quarantined."""
    settings = tiny_settings(training={"time_budget_s": 120}, sandbox={"gpu_release_timeout_s": 0.5},
                             scheduler={"windows": [_window_now()], "idle": {"preempt": True, "poll_seconds": 3600}})
    with _scripted_gpu_lane(settings) as (runtime, probe, scheduler):
        session = _session(runtime, max_experiments=0, gate=scheduler)
        session.open()
        thread, results = _in_background(lambda: session.run(StopCondition(grace_s=30)))
        _wait_for("the sandbox's processes", lambda: bool(runtime.backend.active_pids()))
        probe.memory_used_mb = 70_000.0  # a zombie context keeps the memory after the kill
        probe.foreign.add(999_999)
        scheduler.poll_gpus()
        thread.join(90)
        assert not thread.is_alive(), "the only lane is quarantined: the session ends by itself"
        rows = runtime.store.list_experiments(session_id=session.session_id, limit=10)
        assert [(r.kind, r.status) for r in rows] == [("baseline", "queued"), ("baseline", "preempted")]
        scraped = runtime.metrics.registry.get_sample_value("autoresearch_gpu_quarantined", {"gpu": GPU})
        assert scraped == 1.0
        assert results and results[0].status != "failed"


def test_idle_harvest_session_ends_when_the_gpu_is_busy_again(tiny_settings: Any) -> None:
    """A session opened by idle harvesting ends by itself once a foreign job takes the GPU back."""
    settings = tiny_settings(training={"time_budget_s": 120},
                             scheduler={"idle": {"enabled": True, "minutes": 0, "preempt": True,
                                                 "poll_seconds": 3600}})
    with _scripted_gpu_lane(settings) as (runtime, probe, scheduler):
        assert scheduler.may_launch(GPU), "an idle GPU is harvested at once with idle.minutes = 0"
        session = _session(runtime, max_experiments=0, gate=scheduler, trigger="idle")
        session.open()
        thread, results = _in_background(lambda: session.run(StopCondition(grace_s=30)))
        _wait_for("the sandbox's processes", lambda: bool(runtime.backend.active_pids()))
        probe.foreign.add(999_999)
        scheduler.poll_gpus()
        thread.join(90)
        assert not thread.is_alive(), "the harvest is over: the session ends without a stop request"
        rows = runtime.store.list_experiments(session_id=session.session_id, limit=10)
        assert [(r.kind, r.status) for r in rows] == [("baseline", "queued"), ("baseline", "preempted")]
        assert results and results[0].status != "failed"
