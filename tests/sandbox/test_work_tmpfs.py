"""The train stage's work tmpfs: the candidate's kernel-enforced quota, charged on top of the run's memory."""

from __future__ import annotations

from pathlib import Path

from sandbox.docker_backend import SPLIT_CAPABILITIES, container_config
from sandbox.spec import MODEL_UID, WORK_DIR, WORK_ENV, Limits, Mount, RunSpec

MEMORY, WORK = 1024**3, 256 * 1024**2


def _spec(tmp_path: Path, work_bytes: int, split: bool = True) -> RunSpec:
    out = tmp_path / "out"
    out.mkdir(parents=True)
    return RunSpec(name="work-tmpfs", command=("true",), image="x", mounts=(Mount(out, "/out", True),),
                   limits=Limits(memory_bytes=MEMORY, work_bytes=work_bytes), split_identities=split)


def test_a_split_stage_with_work_bytes_gets_a_sized_work_tmpfs(tmp_path: Path) -> None:
    """The work dir is a tmpfs of exactly work_bytes owned by the model uid, named to the harness in the env."""
    config = container_config(_spec(tmp_path, WORK), "test")
    options = config["tmpfs"][WORK_DIR].split(",")
    assert f"size={WORK}" in options and f"uid={MODEL_UID}" in options and "nr_inodes=10000" in options
    assert config["environment"][WORK_ENV] == WORK_DIR


def test_the_work_tmpfs_is_charged_on_top_of_the_memory_limit(tmp_path: Path) -> None:
    """tmpfs pages count against the memory cgroup: the limit is the run's memory plus the work dir's size."""
    config = container_config(_spec(tmp_path, WORK), "test")
    assert config["mem_limit"] == config["memswap_limit"] == MEMORY + WORK


def test_no_work_tmpfs_without_work_bytes_or_split_identities(tmp_path: Path) -> None:
    """The eval stage (no work_bytes) and an unsplit run get neither the tmpfs nor extra memory."""
    for spec in (_spec(tmp_path / "a", 0), _spec(tmp_path / "b", WORK, split=False)):
        config = container_config(spec, "test")
        assert WORK_DIR not in config["tmpfs"] and WORK_ENV not in config["environment"]
        assert config["mem_limit"] == MEMORY


def test_the_split_stage_root_may_take_the_out_dir() -> None:
    """The train harness makes the out dir its own before the spawn: the split stage's root holds CHOWN."""
    assert "CHOWN" in SPLIT_CAPABILITIES
