"""The `[slurm]` settings: loud errors for incomplete or contradictory configuration, before any run."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import load_settings
from daemon.errors import AutoresearchError, ConfigError
from tests.slurm.test_session import slurm_settings
from tests.slurmcluster import SlurmCluster


def test_slurm_backend_needs_a_shared_dir(tmp_path: Path) -> None:
    """backend = slurm without slurm.shared_dir is refused, saying what it is for."""
    with pytest.raises(ConfigError, match="shared_dir"):
        load_settings(None, workspace=tmp_path, sandbox={"backend": "slurm"})


def test_local_gpu_uuids_contradict_the_slurm_backend(tmp_path: Path) -> None:
    """Listing local GPUs with the slurm backend is refused: Slurm picks the GPUs."""
    with pytest.raises(ConfigError, match="Slurm picks the GPUs"):
        load_settings(None, workspace=tmp_path, gpus=["GPU-1"], sandbox={"backend": "slurm"},
                      slurm={"shared_dir": tmp_path})


@pytest.mark.parametrize("bad", ["-p gpu", "--partition=x\n--wrap=id", "-x"])
def test_extra_sbatch_args_must_be_single_options(tmp_path: Path, bad: str) -> None:
    """extra_args entries are one `--option=value` each: no short options, no smuggled lines."""
    with pytest.raises(ConfigError, match="extra_args"):
        load_settings(None, workspace=tmp_path, slurm={"shared_dir": tmp_path, "extra_args": [bad]})


def test_max_jobs_is_at_least_one(tmp_path: Path) -> None:
    """Zero concurrent jobs is a configuration error, not an idle daemon."""
    with pytest.raises(ConfigError, match="max_jobs"):
        load_settings(None, workspace=tmp_path, slurm={"shared_dir": tmp_path, "max_jobs": 0})


@pytest.mark.slurm
def test_runtime_refuses_a_bad_partition_before_any_run(slurm_cluster: SlurmCluster, prepared_data: Path,
                                                        tmp_path_factory: pytest.TempPathFactory,
                                                        baseline_source: str) -> None:
    """Opening the daemon's runtime with a partition the cluster lacks fails with the partition's name."""
    from daemon.research.workspace import Workspace
    from daemon.service.runtime import open_runtime

    root = tmp_path_factory.mktemp("bad-partition")
    workspace = Workspace.init(root / "ws", baseline_source=baseline_source)
    settings = slurm_settings(slurm_cluster, tmp_path_factory.getbasetemp(), workspace.root, prepared_data, "img",
                              max_jobs=1, instance="slurm-bad")
    settings.slurm.partition = "no-such-partition"
    with pytest.raises(AutoresearchError, match="no-such-partition"):
        open_runtime(settings, daemon=True)
    assert not list((slurm_cluster.shared / "jobs").glob("autoresearch-slurm-bad-*"))


@pytest.mark.slurm
def test_runtime_refuses_a_workspace_the_nodes_cannot_see(slurm_cluster: SlurmCluster, prepared_data: Path,
                                                          tmp_path_factory: pytest.TempPathFactory,
                                                          baseline_source: str) -> None:
    """A workspace outside the shared directory and node_paths is refused before any run, naming it."""
    from daemon.research.workspace import Workspace
    from daemon.service.runtime import open_runtime

    root = tmp_path_factory.mktemp("unshared")
    workspace = Workspace.init(root / "ws", baseline_source=baseline_source)
    settings = slurm_settings(slurm_cluster, tmp_path_factory.getbasetemp(), workspace.root, prepared_data, "img",
                              max_jobs=1, instance="slurm-unshared")
    settings.slurm.node_paths = [prepared_data]
    with pytest.raises(ConfigError, match="not under the Slurm shared directory"):
        open_runtime(settings, daemon=True)
