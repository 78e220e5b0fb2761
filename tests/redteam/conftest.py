"""Red-team fixtures: StageRunners on the real Docker engine (normal and short limits) and on the local backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.research.runner import StageRunner
from sandbox.docker_backend import DockerBackend
from sandbox.local_backend import LocalBackend
from sandbox.spec import Limits
from tests.redteam.redteam_helpers import ENV, EVAL_LIMITS, INSTANCE, REPO_ROOT, SHORT_LIMITS, TRAIN_LIMITS


@pytest.fixture(scope="session")
def docker_backend() -> Iterator[DockerBackend]:
    backend = DockerBackend(INSTANCE)
    yield backend
    backend.close()


def _runner(backend: DockerBackend | LocalBackend, image: str, prepared_data: Path, work_dir: Path,
            train_limits: Limits, eval_limits: Limits) -> StageRunner:
    return StageRunner(backend, image=image, trainer_dir=REPO_ROOT / "trainer", data_dir=prepared_data,
                       work_dir=work_dir, instance=INSTANCE, train_limits=train_limits, eval_limits=eval_limits,
                       env=ENV)


@pytest.fixture(scope="session")
def docker_runner(docker_backend: DockerBackend, trainer_image: str, prepared_data: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> StageRunner:
    return _runner(docker_backend, trainer_image, prepared_data, tmp_path_factory.mktemp("redteam-docker"),
                   TRAIN_LIMITS, EVAL_LIMITS)


@pytest.fixture(scope="session")
def short_docker_runner(docker_backend: DockerBackend, trainer_image: str, prepared_data: Path,
                        tmp_path_factory: pytest.TempPathFactory) -> StageRunner:
    return _runner(docker_backend, trainer_image, prepared_data, tmp_path_factory.mktemp("redteam-short"),
                   SHORT_LIMITS, SHORT_LIMITS)


@pytest.fixture(scope="session")
def local_runner(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> StageRunner:
    return _runner(LocalBackend(INSTANCE), "", prepared_data, tmp_path_factory.mktemp("redteam-local"),
                   TRAIN_LIMITS, EVAL_LIMITS)
