"""Every sandbox run carries its own deadline: it dies even if its daemon never comes back.

The container's PID 1 is coreutils `timeout` (trusted: the run cannot kill or stop it from inside its PID
namespace), and the reaper kills a run past its deadline label even when its owner still lives.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from sandbox import labels as L
from sandbox.docker_backend import DockerBackend, container_config
from sandbox.spec import RunStatus

pytestmark = pytest.mark.docker
INSTANCE = "test-deadline"

# The adversary: ignores SIGTERM, tries to kill and to stop PID 1 (the deadline wrapper), and leaves a
# grandchild in a session of its own that ignores SIGTERM too; all of it must die at the deadline.
ESCAPE = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
results = []
for sig in (signal.SIGKILL, signal.SIGSTOP):
    try:
        os.kill(1, sig)
        results.append(f"{sig.name} sent")
    except OSError as exc:
        results.append(f"{sig.name} refused: {exc}")
if os.fork() == 0:
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(3600)
    os._exit(0)
open(sys.argv[1] + "/tried.txt", "w").write("\\n".join(results) + "\\n")
while True:
    time.sleep(1)
"""


@pytest.fixture()
def client() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    yield client
    for leftover in client.containers.list(all=True, filters={"label": f"{L.INSTANCE}={INSTANCE}"}):
        leftover.remove(force=True)
    client.close()


def test_container_command_and_labels_carry_the_deadline(script_spec) -> None:
    """container_config wraps the command in `timeout` and labels the absolute deadline."""
    spec = script_spec("pass", image="x", timeout_s=100.0)
    spec.out_mount().source.mkdir()
    before = time.time()
    config = container_config(spec, INSTANCE)
    assert config["command"][:3] == ["timeout", "--kill-after=10", str(int(100 + L.DEADLINE_MARGIN_S) + 1)]
    assert config["command"][3:] == list(spec.command)
    deadline = int(config["labels"][L.DEADLINE])
    assert before + 100 + L.DEADLINE_MARGIN_S <= deadline <= time.time() + 100 + L.DEADLINE_MARGIN_S + 2


@pytest.mark.slow
def test_run_whose_daemon_is_gone_dies_at_its_deadline_despite_escape_attempts(
        client: docker.DockerClient, trainer_image: str, script_spec) -> None:
    """Started and abandoned (no daemon waits on it): the run ends by itself, its SIGKILL/SIGSTOP of PID 1 void."""
    spec = script_spec(ESCAPE, image=trainer_image, timeout_s=1.0,
                       labels={L.INSTANCE: INSTANCE, L.OWNER: f"{INSTANCE}:1-1-gone-gone"})
    out = spec.out_mount().source
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o777)
    container = client.containers.create(**container_config(spec, INSTANCE))
    container.start()
    deadline = time.monotonic() + L.DEADLINE_MARGIN_S + 120
    while time.monotonic() < deadline:
        container.reload()
        if container.status == "exited":
            break
        time.sleep(1)
    assert container.status == "exited", "the abandoned run outlived its deadline"
    assert container.attrs["State"]["ExitCode"] in (124, 137)
    tried = (out / "tried.txt").read_text()
    assert "SIGKILL" in tried and "SIGSTOP" in tried, tried


@pytest.mark.slow
def test_reaper_kills_a_run_past_its_deadline_even_with_a_live_owner(
        client: docker.DockerClient, trainer_image: str, tmp_path: Path) -> None:
    """A live owner's run is left alone until its deadline label has passed; then it is killed (interrupted)."""
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    base = {L.INSTANCE: INSTANCE, L.OWNER: f"{INSTANCE}:alive", L.STAGE: "train", L.ATTEMPT: "1",
            L.EXPERIMENT: "7"}
    for name, deadline in (("ar-deadline-past", time.time() - 5), ("ar-deadline-future", time.time() + 3600)):
        client.containers.run(trainer_image, ["sleep", "600"], name=name, detach=True, user="1000",
                              network_mode="none", labels={**base, L.DEADLINE: str(int(deadline))},
                              mounts=[docker.types.Mount("/out", str(out), type="bind")])
    backend = DockerBackend(INSTANCE)
    try:
        reaped = {r.name: r for r in backend.reap(lambda owner: owner == f"{INSTANCE}:alive")}
    finally:
        backend.close()
    assert set(reaped) == {"ar-deadline-past"}
    assert reaped["ar-deadline-past"].action == "killed"
    assert reaped["ar-deadline-past"].result is not None
    assert reaped["ar-deadline-past"].result.status is RunStatus.INTERRUPTED
    assert client.containers.get("ar-deadline-future").status == "running"


@pytest.mark.parametrize(("value", "past"), [("", False), ("soon", False), ("1", True), ("99999999999", False)])
def test_deadline_label_parsing(value: str, past: bool) -> None:
    """Only a numeric deadline in the past counts; a missing or malformed one never kills."""
    labels = {L.DEADLINE: value} if value else {}
    assert L.past_deadline(labels) is past
