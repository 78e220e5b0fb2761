"""Bounded disk: pruning keeps the newest images and every image in use, removes our dangling build
leftovers, and never touches an image that is not ours (real Docker, small images made for the test)."""

from __future__ import annotations

import io
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.prune import prune_images, prune_run_folders, prune_wheels

pytestmark = pytest.mark.docker


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class Images:
    """Tiny images in repositories of their own (unique names), all removed at the end."""

    def __init__(self, client: Any) -> None:
        self.client = client
        suffix = uuid.uuid4().hex[:8]
        self.trainer, self.base, self.stranger = (f"prune-test-{kind}-{suffix}" for kind in ("trainer", "base", "x"))
        self.containers: list[Any] = []

    def import_image(self, repo: str, tag: str, payload: bytes) -> Any:
        self.client.api.import_image_from_data(_tar({"payload": payload}), repository=repo, tag=tag)
        return self.client.images.get(f"{repo}:{tag}")

    def build_on(self, base: str, tag: str, payload: bytes, tmp: Path) -> Any:
        context = tmp / uuid.uuid4().hex
        context.mkdir()
        (context / "Dockerfile").write_text(f"FROM {base}\nCOPY f /f\n")
        (context / "f").write_bytes(payload)
        image, _ = self.client.images.build(path=str(context), tag=tag, rm=True)
        time.sleep(1.1)  # distinct creation times (Docker's are in seconds for built images)
        return image

    def use(self, image: Any) -> None:
        self.containers.append(self.client.containers.create(image.id, command=["/nothing"]))

    def cleanup(self) -> None:
        for container in self.containers:
            container.remove(force=True)
        for repo in (self.trainer, self.stranger, self.base):
            for image in self.client.images.list(name=repo):
                for tag in image.tags:
                    self.client.images.remove(tag, force=True)


@pytest.fixture()
def images(docker_client: Any) -> Iterator[Images]:
    made = Images(docker_client)
    yield made
    made.cleanup()


@pytest.fixture()
def docker_client() -> Iterator[Any]:
    from tests.conftest import _docker_reason

    if (reason := _docker_reason()) is not None:
        pytest.skip(reason)
    import docker

    client = docker.from_env()
    yield client
    client.close()


def _tags(client: Any, repo: str) -> set[str]:
    return {tag for image in client.images.list(name=repo) for tag in image.tags}


def test_keeps_the_newest_and_the_images_in_use(images: Images, tmp_path: Path) -> None:
    """With keep=1: the newest image, the one a container uses and the protected one stay; the rest go."""
    base = images.import_image(images.base, "b1", b"base")
    made = [images.build_on(base.tags[0], f"{images.trainer}:h{i}", f"v{i}".encode(), tmp_path) for i in range(4)]
    images.use(made[0])
    report = prune_images(images.client, keep=1, protect=[f"{images.trainer}:h1"],
                          trainer_repo=images.trainer, base_repo=images.base)
    assert _tags(images.client, images.trainer) == {f"{images.trainer}:h0", f"{images.trainer}:h1",
                                                    f"{images.trainer}:h3"}
    assert _tags(images.client, images.base) == {f"{images.base}:b1"}, "the base under kept images stays"
    assert report.freed_bytes >= 0 and any("h2" in line for line in report.removed)


def test_dry_run_removes_nothing(images: Images, tmp_path: Path) -> None:
    """A dry run lists what it would remove and leaves every image in place."""
    base = images.import_image(images.base, "b1", b"base")
    for i in range(3):
        images.build_on(base.tags[0], f"{images.trainer}:h{i}", f"v{i}".encode(), tmp_path)
    report = prune_images(images.client, keep=1, dry_run=True, trainer_repo=images.trainer, base_repo=images.base)
    assert len(_tags(images.client, images.trainer)) == 3 and len(report.removed) == 2


def test_dangling_leftovers_of_our_builds_go_and_strangers_stay(images: Images, tmp_path: Path) -> None:
    """A dangling image built on our base is removed; another user's dangling image is left alone."""
    base = images.import_image(images.base, "b1", b"base")
    first = images.build_on(base.tags[0], f"{images.trainer}:same", b"one", tmp_path)
    images.build_on(base.tags[0], f"{images.trainer}:same", b"two", tmp_path)  # `first` is now dangling
    other = images.import_image(images.stranger, "s", b"someone else's")
    stranger = images.build_on(other.tags[0], f"{images.stranger}:top", b"a", tmp_path)
    images.build_on(other.tags[0], f"{images.stranger}:top", b"b", tmp_path)  # the stranger's dangling image
    prune_images(images.client, keep=5, trainer_repo=images.trainer, base_repo=images.base, dangling_min_age_s=0)
    import docker

    with pytest.raises(docker.errors.ImageNotFound):
        images.client.images.get(first.id)
    assert images.client.images.get(stranger.id).id == stranger.id
    images.client.images.remove(stranger.id)


def test_keep_below_one_is_refused(images: Images) -> None:
    """keep=0 would remove the newest image too: refused."""
    with pytest.raises(ValueError, match="at least 1"):
        prune_images(images.client, keep=0, trainer_repo=images.trainer, base_repo=images.base)


@pytest.mark.parametrize("dry_run", [False, True])
def test_old_run_folders_go_active_and_young_ones_stay(tmp_path: Path, dry_run: bool) -> None:
    """Leftover run folders past the retention are removed; active and young ones stay."""
    import os

    runs = tmp_path / "runs"
    old, active, young = (runs / name for name in ("exp-1-a1", "exp-2-a1", "exp-3-a1"))
    (old / "out" / "ckpt").mkdir(parents=True)
    active.mkdir()
    young.mkdir()
    week_ago = time.time() - 8 * 86400
    for folder in (old, active):
        os.utime(folder, (week_ago, week_ago))
    report = prune_run_folders(runs, older_than_days=7, active=["exp-2-a1"], dry_run=dry_run)
    assert [line.split(" ")[0] for line in report.removed] == [str(old)]
    assert old.exists() == dry_run and active.exists() and young.exists()


def test_only_the_newest_wheel_sets_are_kept(tmp_path: Path) -> None:
    """The wheel cache keeps its newest sets and removes the older ones."""
    import os

    wheels = tmp_path / "wheels"
    for i in range(4):
        folder = wheels / f"set{i}"
        folder.mkdir(parents=True)
        (folder / "w.whl").write_bytes(b"x" * 100)
        os.utime(folder, (1000 + i, 1000 + i))
    report = prune_wheels(keep=2, root=tmp_path)
    assert sorted(p.name for p in wheels.iterdir()) == ["set2", "set3"]
    assert report.freed_bytes == 200
