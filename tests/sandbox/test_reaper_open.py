"""Reaper reconciliation on the real engine, backend selection, and the offline image cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

import sandbox
from sandbox import labels as L
from sandbox.docker_backend import DockerBackend
from sandbox.errors import BackendUnavailable
from sandbox.images import ensure_offline_image
from sandbox.local_backend import LocalBackend
from sandbox.spec import RunStatus

INSTANCE = "test-reaper"


@pytest.fixture()
def client() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    yield client
    for leftover in client.containers.list(all=True, filters={"label": f"{L.INSTANCE}={INSTANCE}"}):
        leftover.remove(force=True)
    client.close()


def _start(client: docker.DockerClient, image: str, tmp_path: Path, name: str, owner: str, code: str,
           instance: str = INSTANCE, experiment: bool = True) -> None:
    out = tmp_path / name
    out.mkdir()
    out.chmod(0o777)
    run_labels = {L.INSTANCE: instance, L.OWNER: owner, L.STAGE: "train", L.ATTEMPT: "1"}
    if experiment:
        run_labels[L.EXPERIMENT] = "7"
    client.containers.run(image, ["python3", "-c", code], name=name, labels=run_labels, detach=True, user="1000",
                          network_mode="none", mounts=[docker.types.Mount("/out", str(out), type="bind")])


@pytest.mark.docker
def test_reaper_reconciles_by_state_and_owner(client: docker.DockerClient, trainer_image: str, tmp_path: Path) -> None:
    """Finished: collected; orphaned running: killed as interrupted; live owner, other instance: untouched."""
    _start(client, trainer_image, tmp_path, "ar-reap-finished", "gone:1", "open('/out/r.json','w').write('{}')")
    _start(client, trainer_image, tmp_path, "ar-reap-orphan", "gone:2", "import time; time.sleep(300)")
    _start(client, trainer_image, tmp_path, "ar-reap-live", "alive:3", "import time; time.sleep(300)")
    _start(client, trainer_image, tmp_path, "ar-reap-unknown", "gone:4", "pass", experiment=False)
    _start(client, trainer_image, tmp_path, "ar-reap-other", "gone:5", "import time; time.sleep(300)",
           instance="someone-else")
    try:
        client.containers.get("ar-reap-finished").wait(timeout=60)
        backend = DockerBackend(INSTANCE)
        reaped = {r.name: r for r in backend.reap(lambda owner: owner.startswith("alive:"))}
        backend.close()
        assert reaped["ar-reap-finished"].action == "collected"
        assert reaped["ar-reap-finished"].result is not None and reaped["ar-reap-finished"].result.files == {"r.json": b"{}"}
        assert reaped["ar-reap-orphan"].action == "killed"
        assert reaped["ar-reap-orphan"].result is not None
        assert reaped["ar-reap-orphan"].result.status is RunStatus.INTERRUPTED
        assert reaped["ar-reap-unknown"].action == "removed"
        assert set(reaped) == {"ar-reap-finished", "ar-reap-orphan", "ar-reap-unknown"}
        remaining = {c.name for c in client.containers.list(all=True, filters={"name": "ar-reap-"})}
        assert remaining == {"ar-reap-live", "ar-reap-other"}
    finally:
        client.containers.get("ar-reap-other").remove(force=True)


def test_open_backend_local_is_local() -> None:
    """Asking for the local backend gives it, whatever Docker says."""
    assert isinstance(sandbox.open_backend("local", image="", instance="t"), LocalBackend)


@pytest.mark.docker
def test_open_backend_docker_without_image_says_how_to_build() -> None:
    """The docker backend with an absent image raises BackendUnavailable naming the build command."""
    with pytest.raises(BackendUnavailable, match="autoresearch image build"):
        sandbox.open_backend("docker", image="autoresearch-trainer:absent", instance="t")


def test_open_backend_rejects_unknown_kind() -> None:
    """A misspelt backend kind is a clear error, not a silent fallback."""
    with pytest.raises(BackendUnavailable, match="unknown sandbox backend"):
        sandbox.open_backend("podman", image="", instance="t")  # type: ignore[arg-type]


@pytest.mark.docker
def test_offline_image_is_cached(trainer_image: str) -> None:
    """A second ensure_offline_image with unchanged inputs builds nothing and returns the same tag."""
    lines: list[str] = []
    assert ensure_offline_image(progress=lines.append) == trainer_image
    assert lines == []
    assert docker.from_env().images.get("autoresearch-trainer:offline").id == docker.from_env().images.get(trainer_image).id
