"""`autoresearch doctor` for the Slurm backend against the suite's cluster and this node's Docker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon.cli.doctor import FAIL, OK, Check
from daemon.cli.doctor_slurm import check_slurm
from daemon.config import Settings, load_settings
from tests.slurm.test_session import slurm_section
from tests.slurmcluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.docker]


def _settings(cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory, image: str,
              **slurm: Any) -> Settings:
    root = tmp_path_factory.mktemp("doctor")
    section = {**slurm_section(cluster, tmp_path_factory.getbasetemp(), 1), **slurm}
    return load_settings(None, workspace=root / "ws", data={"dir": root / "data"},
                         sandbox={"backend": "slurm", "image": image}, slurm=section)


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


def test_doctor_passes_on_a_working_cluster(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory,
                                            trainer_image: str) -> None:
    """Commands, shared dir, partition, node paths and the node's Docker with the image: every line ok."""
    checks = _by_name(check_slurm(_settings(slurm_cluster, tmp_path_factory, trainer_image)))
    assert [name for name, check in checks.items() if check.verdict != OK] == [], checks
    assert trainer_image in checks["slurm node runtime"].detail


def test_doctor_fails_when_the_node_lacks_the_image(slurm_cluster: SlurmCluster,
                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    """A node whose engine does not have the trainer image is a FAIL saying so, with how to load it."""
    checks = _by_name(check_slurm(_settings(slurm_cluster, tmp_path_factory, "autoresearch-no-such-image:0")))
    node = checks["slurm node runtime"]
    assert node.verdict == FAIL and "missing" in node.detail and "docker load" in node.fix


def test_doctor_fails_on_an_unknown_partition(slurm_cluster: SlurmCluster,
                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    """A partition the cluster does not have is a FAIL naming it; no probe job is sent."""
    checks = _by_name(check_slurm(_settings(slurm_cluster, tmp_path_factory, "img", partition="gpu-h100")))
    assert checks["slurm partition"].verdict == FAIL and "gpu-h100" in checks["slurm partition"].detail
    assert "slurm node runtime" not in checks


def test_doctor_fails_on_a_missing_shared_dir(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory,
                                              tmp_path: Path) -> None:
    """A shared directory that does not exist is a FAIL with how to fix it."""
    checks = _by_name(check_slurm(_settings(slurm_cluster, tmp_path_factory, "img",
                                            shared_dir=tmp_path / "not-mounted")))
    assert checks["slurm shared dir"].verdict == FAIL and "not-mounted" in checks["slurm shared dir"].detail


def test_doctor_says_nothing_about_slurm_for_other_backends(tmp_path: Path) -> None:
    """With the docker backend there are no Slurm lines at all."""
    assert check_slurm(load_settings(None, workspace=tmp_path, sandbox={"backend": "docker"})) == []
