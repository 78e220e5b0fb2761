"""The Docker backend against the real engine and the offline trainer image."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import docker
import pytest

from sandbox.docker_backend import DockerBackend
from sandbox.spec import Cancel, RunSpec, RunStatus

pytestmark = pytest.mark.docker
SpecFactory = Callable[..., RunSpec]
INSTANCE = "test-docker-backend"


@pytest.fixture(scope="module")
def backend() -> Iterator[DockerBackend]:
    backend = DockerBackend(INSTANCE)
    yield backend
    backend.close()


def _leftovers(name: str) -> list[object]:
    client = docker.from_env()
    try:
        return list(client.containers.list(all=True, filters={"name": name}))
    finally:
        client.close()


HARDENING_PROBE = """
import os, socket, subprocess
print("uid", os.getuid())
print("caps", [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0])
print("nnp", [l.split()[1] for l in open("/proc/self/status") if l.startswith("NoNewPrivs")][0])
print("ifaces", sorted(os.listdir("/sys/class/net")))
for path in ("/usr/evil", "/data-evil", "/tmp/x.sh"):
    try:
        open(path, "w").write("#!/bin/sh\\necho tmp-exec-ok\\n"); print("wrote", path)
    except OSError as e:
        print("denied", path, e.errno)
os.chmod("/tmp/x.sh", 0o755)
print(subprocess.run(["/tmp/x.sh"], capture_output=True, text=True).stdout.strip())
print("pids.max", open("/sys/fs/cgroup/pids/pids.max").read().strip())
"""


def test_container_is_hardened(backend: DockerBackend, script_spec: SpecFactory, trainer_image: str) -> None:
    """Inside: uid 1000, no capabilities, no-new-privs, loopback only, read-only root, exec tmpfs, pids cap."""
    result = backend.run(script_spec(HARDENING_PROBE, image=trainer_image, pids=512))
    tail = result.output_tail
    assert result.status is RunStatus.OK, tail
    assert "uid 1000" in tail and "caps 0000000000000000" in tail and "nnp 1" in tail
    assert "ifaces ['lo']" in tail
    assert "denied /usr/evil 30" in tail and "denied /data-evil 30" in tail and "wrote /tmp/x.sh" in tail
    assert "tmp-exec-ok" in tail and "pids.max 512" in tail


def test_ok_run_returns_out_files_and_removes_container(backend: DockerBackend, script_spec: SpecFactory,
                                                        trainer_image: str) -> None:
    """A clean exit is ok; its out file comes back; the container is gone afterwards."""
    spec = script_spec("import sys\nopen(sys.argv[1] + '/r.json', 'w').write('{\"a\": 1}')\n", image=trainer_image)
    result = backend.run(spec)
    assert result.status is RunStatus.OK and result.files == {"r.json": b'{"a": 1}'}
    assert _leftovers(spec.name) == []


def test_timeout_is_enforced_from_outside(backend: DockerBackend, script_spec: SpecFactory, trainer_image: str) -> None:
    """A run that ignores its budget is killed at the limit and reported as timeout."""
    spec = script_spec("import time\ntime.sleep(120)\n", image=trainer_image, timeout_s=2)
    result = backend.run(spec)
    assert result.status is RunStatus.TIMEOUT and _leftovers(spec.name) == []


def test_memory_limit_reports_oom(backend: DockerBackend, script_spec: SpecFactory, trainer_image: str) -> None:
    """Touching more memory than the limit is an OOM kill, told apart from a crash and a timeout."""
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 1024**2))\n"
    result = backend.run(script_spec(code, image=trainer_image, memory_bytes=256 * 1024**2))
    assert result.status is RunStatus.OOM and result.oom_killed and result.exit_code == 137


def test_cancel_interrupts_a_running_container(backend: DockerBackend, script_spec: SpecFactory,
                                               trainer_image: str) -> None:
    """A Cancel set during the wait kills the container and the run ends `interrupted`."""
    cancel = Cancel()
    threading.Timer(1.0, cancel.set, args=(RunStatus.INTERRUPTED,)).start()
    spec = script_spec("import time\ntime.sleep(120)\n", image=trainer_image)
    assert backend.run(spec, cancel).status is RunStatus.INTERRUPTED
    assert _leftovers(spec.name) == []


def test_failed_start_removes_the_created_container(backend: DockerBackend, script_spec: SpecFactory,
                                                    trainer_image: str) -> None:
    """A command that cannot start is an infra_error and leaves no container behind."""
    spec = script_spec("pass", image=trainer_image)
    spec = RunSpec(name=spec.name, command=("/no/such/binary",), image=trainer_image, mounts=spec.mounts,
                   limits=spec.limits)
    result = backend.run(spec)
    assert result.status is RunStatus.INFRA_ERROR and "did not start" in result.error
    assert _leftovers(spec.name) == []


def test_missing_image_says_how_to_build_it(backend: DockerBackend, script_spec: SpecFactory) -> None:
    """An absent image is an infra_error whose message names the build command."""
    result = backend.run(script_spec("pass", image="autoresearch-trainer:does-not-exist"))
    assert result.status is RunStatus.INFRA_ERROR and "autoresearch image build" in result.error


def test_output_tail_is_capped_and_sanitized(backend: DockerBackend, script_spec: SpecFactory,
                                             trainer_image: str) -> None:
    """Megabytes of output with escape codes come back as a short, clean tail."""
    code = "import sys\nfor i in range(20000):\n    print('\\x1b[31mline', i, '\\x07' + 'x' * 100)\nprint('LAST')\n"
    result = backend.run(script_spec(code, image=trainer_image))
    assert len(result.output_tail.encode()) <= 4096 and result.output_tail.rstrip().endswith("LAST")
    assert "\x1b" not in result.output_tail and "\x07" not in result.output_tail


def test_gpu_is_requested_by_uuid_only(backend: DockerBackend, script_spec: SpecFactory, trainer_image: str) -> None:
    """The host config asks for exactly the run's GPU by UUID, never all GPUs."""
    spec = script_spec("pass", image=trainer_image, gpu_uuid="GPU-0000-test")
    spec.out_mount().source.mkdir()
    container = backend._create(spec)
    try:
        container.reload()
        requests = container.attrs["HostConfig"]["DeviceRequests"]
        env = container.attrs["Config"]["Env"]
    finally:
        container.remove(force=True)
    assert len(requests) == 1
    assert requests[0]["DeviceIDs"] == ["GPU-0000-test"] and requests[0]["Count"] == 0
    assert "NVIDIA_VISIBLE_DEVICES=GPU-0000-test" in env  # an image's `all` must not widen it


def test_run_without_gpu_hides_every_gpu(backend: DockerBackend, script_spec: SpecFactory, trainer_image: str) -> None:
    """A CPU run sets NVIDIA_VISIBLE_DEVICES=void, so an nvidia default runtime exposes no GPU to it."""
    spec = script_spec("pass", image=trainer_image)
    spec.out_mount().source.mkdir()
    container = backend._create(spec)
    try:
        container.reload()
        env = container.attrs["Config"]["Env"]
    finally:
        container.remove(force=True)
    assert "NVIDIA_VISIBLE_DEVICES=void" in env


def test_retried_create_replaces_the_leftover_of_the_same_name(backend: DockerBackend, script_spec: SpecFactory,
                                                              trainer_image: str) -> None:
    """Creating the same named run twice (a retry after a crash) yields one fresh container, not two or an error."""
    spec = script_spec("pass", image=trainer_image)
    spec.out_mount().source.mkdir()
    first = backend._create(spec)
    second = backend._create(spec)
    try:
        assert first.id != second.id and [c.id for c in _leftovers(spec.name)] == [second.id]
    finally:
        second.remove(force=True)
