"""The suite's own single-node Slurm cluster (one per test session) and a Slurm backend bound to it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.slurm import SlurmBackend, SlurmOptions
from tests.conftest import REPO_ROOT
from tests.sandbox.conftest import script_spec  # noqa: F401 - the sandbox tests' fixture, used here too
from tests.slurmcluster import PARTITION, SlurmCluster, missing_reason


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """munged + slurmctld + slurmd started for this test session on free ports, stopped at its end."""
    if (reason := missing_reason()) is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must provide slurm: {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def slurm_options(cluster: SlurmCluster, tmp_root: Path, **overrides: object) -> SlurmOptions:
    """Options for `cluster`: its shared dir, the test's temp tree and the trainer as node paths, fast polls."""
    values: dict[str, object] = {
        "shared_dir": cluster.shared, "partition": PARTITION, "account": "lab",
        "node_paths": (tmp_root, REPO_ROOT / "trainer"), "slurm_conf": cluster.conf,
        "jobcomp_log": cluster.jobcomp, "poll_s": 0.3, "time_slack_s": 30.0,
    }
    values.update(overrides)
    return SlurmOptions(**values)  # type: ignore[arg-type]


@pytest.fixture()
def slurm_backend(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> SlurmBackend:
    """A backend submitting to the `normal` partition as account `lab`."""
    return SlurmBackend("test-slurm", slurm_options(slurm_cluster, tmp_path_factory.getbasetemp()))
