"""Backends list the host PIDs of their running sandboxes, so the GPU scheduler can tell them from foreign jobs."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

from sandbox.base import Backend
from sandbox.labels import run_labels
from sandbox.local_backend import LocalBackend
from sandbox.spec import Cancel, RunResult, RunSpec, RunStatus
from tests.sandbox.conftest import SpecFactory

SLEEPER = "import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n" \
          "time.sleep(60)\n"


def _sleep_spec(script_spec: SpecFactory, instance: str, image: str = "") -> RunSpec:
    return script_spec(SLEEPER, image=image, timeout_s=60, name=f"autoresearch-{instance}-1-1-train",
                       labels=run_labels(instance, 1, "train", 1))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:  # already gone
        return ""


def _commands_while_running(backend: Backend, spec: RunSpec) -> tuple[list[str], RunResult]:
    """Start the sleeper, poll `active_pids` until the script and its child show up, cancel the run.

    Returns the command lines of the reported PIDs (read from the host's /proc) and the run's result.
    """
    cancel = Cancel()
    results: list[RunResult] = []
    runner = threading.Thread(target=lambda: results.append(backend.run(spec, cancel)))
    runner.start()
    commands: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (_has_script(commands) and _has_child(commands)):
            time.sleep(0.2)
            commands = [_cmdline(pid) for pid in backend.active_pids()]
    finally:
        cancel.set(RunStatus.INTERRUPTED)
        runner.join(60)
    return commands, results[0]


def _has_script(commands: list[str]) -> bool:
    return any("candidate/script.py" in command for command in commands)


def _has_child(commands: list[str]) -> bool:
    return any("time.sleep(60)" in command for command in commands)


def test_local_backend_reports_the_running_sleep_and_its_child(script_spec: SpecFactory) -> None:
    """The local backend's active PIDs hold the candidate and the child it started; none once the run ended."""
    backend = LocalBackend("test-active-pids")
    commands, result = _commands_while_running(backend, _sleep_spec(script_spec, "test-active-pids"))
    assert result.status is RunStatus.INTERRUPTED
    assert _has_script(commands) and _has_child(commands), commands
    assert backend.active_pids() == set()


@pytest.mark.docker
def test_docker_backend_reports_host_pids_of_its_containers(script_spec: SpecFactory, trainer_image: str) -> None:
    """The Docker backend's active PIDs are host PIDs of the sleeping container's processes; none afterwards."""
    from sandbox.docker_backend import DockerBackend

    instance = f"test-pids-{uuid.uuid4().hex[:6]}"
    backend = DockerBackend(instance)
    try:
        commands, result = _commands_while_running(backend, _sleep_spec(script_spec, instance, image=trainer_image))
        assert result.status is RunStatus.INTERRUPTED
        assert _has_script(commands) and _has_child(commands), commands
        assert backend.active_pids() == set()
    finally:
        backend.close()
