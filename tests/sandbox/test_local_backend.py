"""The local (development) backend: real subprocesses, namespaces, rlimits, kills."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox.errors import InvalidSpec
from sandbox.local_backend import LocalBackend, rewrite_path
from sandbox.spec import Cancel, Mount, RunSpec, RunStatus

SpecFactory = Callable[..., RunSpec]


@pytest.fixture(scope="module")
def backend() -> LocalBackend:
    return LocalBackend("test-local")


def test_mount_targets_are_rewritten_to_host_paths() -> None:
    """Arguments starting with a mount target point at the mount's host source; others are left alone."""
    mounts = (Mount(Path("/host/run/out"), "/out", True), Mount(Path("/host/data/train"), "/data"))
    assert rewrite_path("/out/result.json", mounts) == "/host/run/out/result.json"
    assert rewrite_path("/data", mounts) == "/host/data/train"
    assert rewrite_path("/outside", mounts) == "/outside"


def test_ok_run_collects_out_files(backend: LocalBackend, script_spec: SpecFactory) -> None:
    """A clean exit is ok, its output tail and out files come back."""
    spec = script_spec("import sys\nprint('hello')\nopen(sys.argv[1] + '/r.json', 'w').write('{}')\n")
    result = backend.run(spec)
    assert result.status is RunStatus.OK and result.exit_code == 0
    assert "hello" in result.output_tail and result.files == {"r.json": b"{}"}


def test_nonzero_exit_is_failed(backend: LocalBackend, script_spec: SpecFactory) -> None:
    """A crash is `failed` with its exit code and traceback tail."""
    result = backend.run(script_spec("raise SystemExit(7)"))
    assert result.status is RunStatus.FAILED and result.exit_code == 7


def test_network_is_cut(backend: LocalBackend, script_spec: SpecFactory) -> None:
    """With namespaces available, a TCP connection to an outside address fails."""
    if not backend.network_isolated:
        pytest.skip("this kernel refuses network namespaces")
    code = "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=3)\n    print('EGRESS')\nexcept OSError as e:\n    print('blocked', e)\n"
    result = backend.run(script_spec(code))
    assert "blocked" in result.output_tail and "EGRESS" not in result.output_tail


def test_timeout_kills_setsid_grandchildren(backend: LocalBackend, script_spec: SpecFactory, tmp_path: Path) -> None:
    """A grandchild that escaped into its own session dies with the run at the timeout."""
    marker = tmp_path / "survivor"
    grandchild = f"import time; time.sleep(4); open({str(marker)!r}, 'w')"
    code = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {grandchild!r}], start_new_session=True)\n"
        "time.sleep(60)\n"
    )
    result = backend.run(script_spec(code, timeout_s=1.5))
    assert result.status is RunStatus.TIMEOUT
    threading.Event().wait(4)
    assert not marker.exists()


def test_cancel_ends_run_with_its_reason(backend: LocalBackend, script_spec: SpecFactory) -> None:
    """A Cancel set while the run waits ends it with the requested status (preempted)."""
    cancel = Cancel()
    threading.Timer(0.5, cancel.set, args=(RunStatus.PREEMPTED,)).start()
    result = backend.run(script_spec("import time\ntime.sleep(60)\n"), cancel)
    assert result.status is RunStatus.PREEMPTED


def test_gpu_pinning_by_uuid(backend: LocalBackend, script_spec: SpecFactory) -> None:
    """CUDA_VISIBLE_DEVICES names exactly the run's GPU, and is empty without one."""
    code = "import os\nprint('CVD=' + os.environ['CUDA_VISIBLE_DEVICES'] + '|')\n"
    assert "CVD=GPU-abc|" in backend.run(script_spec(code, gpu_uuid="GPU-abc")).output_tail
    assert "CVD=|" in backend.run(script_spec(code)).output_tail


def test_address_space_limit_reports_oom(backend: LocalBackend, script_spec: SpecFactory) -> None:
    """Allocating past the memory limit is reported as oom, not as a plain crash."""
    result = backend.run(script_spec("x = bytearray(3 * 1024**3)\n", memory_bytes=1024**3))
    assert result.status is RunStatus.OOM and result.oom_killed


def test_missing_mount_source_is_refused(backend: LocalBackend, script_spec: SpecFactory, tmp_path: Path) -> None:
    """A spec mounting a path that does not exist raises InvalidSpec naming it."""
    spec = script_spec("pass")
    broken = type(spec)(name=spec.name, command=spec.command,
                        mounts=(*spec.mounts, Mount(tmp_path / "nope", "/data")))
    with pytest.raises(InvalidSpec, match="nope"):
        backend.run(broken)


def test_runs_do_not_inherit_daemon_secrets(backend: LocalBackend, script_spec: SpecFactory) -> None:
    """The daemon's environment (API keys) does not reach the candidate."""
    os.environ["AUTORESEARCH_AGENT__API_KEY"] = "sk-secret"
    try:
        result = backend.run(script_spec("import os\nprint(sorted(k for k in os.environ if 'API' in k))\n"))
    finally:
        del os.environ["AUTORESEARCH_AGENT__API_KEY"]
    assert "sk-secret" not in result.output_tail and "[]" in result.output_tail
