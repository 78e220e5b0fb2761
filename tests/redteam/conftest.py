"""Red-team fixtures: StageRunners on the real Docker engine (normal and short limits) and on the local backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.runner import StageRunner
from sandbox.docker_backend import DockerBackend
from sandbox.local_backend import LocalBackend
from tests.redteam.redteam_helpers import ENV, EVAL_LIMITS, INSTANCE, REPO_ROOT, SHORT_LIMITS, TRAIN_LIMITS


@pytest.fixture(scope="session")
def docker_backend() -> Iterator[DockerBackend]:
    backend = DockerBackend(INSTANCE)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def docker_runner(docker_backend: DockerBackend, trainer_image: str, prepared_data: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> StageRunner:
    return StageRunner(docker_backend, image=trainer_image, trainer_dir=REPO_ROOT / "trainer",
                       data_dir=prepared_data, work_dir=tmp_path_factory.mktemp("redteam-docker"), instance=INSTANCE,
                       train_limits=TRAIN_LIMITS, eval_limits=EVAL_LIMITS, env=ENV)


@pytest.fixture(scope="session")
def short_docker_runner(docker_backend: DockerBackend, trainer_image: str, prepared_data: Path,
                        tmp_path_factory: pytest.TempPathFactory) -> StageRunner:
    return StageRunner(docker_backend, image=trainer_image, trainer_dir=REPO_ROOT / "trainer",
                       data_dir=prepared_data, work_dir=tmp_path_factory.mktemp("redteam-short"), instance=INSTANCE,
                       train_limits=SHORT_LIMITS, eval_limits=SHORT_LIMITS, env=ENV)


@pytest.fixture(scope="session")
def local_runner(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> StageRunner:
    return StageRunner(LocalBackend(INSTANCE), image="", trainer_dir=REPO_ROOT / "trainer", data_dir=prepared_data,
                       work_dir=tmp_path_factory.mktemp("redteam-local"), instance=INSTANCE,
                       train_limits=TRAIN_LIMITS, eval_limits=EVAL_LIMITS, env=ENV)
