"""Start-up reconciliation of Slurm jobs a dead daemon left behind (job folders + labelled queue entries)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from sandbox import labels as L
from sandbox.slurm import SlurmBackend
from sandbox.spec import RunSpec, RunStatus
from tests.slurmcluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.docker]
SpecFactory = Callable[..., RunSpec]
DEAD_OWNER = "test-slurm:999999999"


def _abandon(backend: SlurmBackend, spec: RunSpec) -> str:
    """Submit `spec` the way `run` does, then walk away (a daemon that died right after sbatch answered)."""
    from sandbox.outfiles import prepare_out_dir

    prepare_out_dir(spec.out_mount().source)
    job_dir = backend.jobs_dir / spec.name
    script = backend._write_job(spec, job_dir)
    job_id = backend.client.submit(backend.sbatch_options(spec, job_dir), script)
    backend._write_meta(job_dir, spec, job_id)
    return job_id


def _labels() -> dict[str, str]:
    return {L.OWNER: DEAD_OWNER, L.EXPERIMENT: "1", L.STAGE: "train", L.ATTEMPT: "1", L.INSTANCE: "test-slurm"}


def _wait_final(backend: SlurmBackend, job_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = backend.client.job(job_id)
        if info is not None and info.final:
            return
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never finished")


def test_finished_job_of_a_dead_daemon_is_collected(slurm_backend: SlurmBackend, script_spec: SpecFactory,
                                                    trainer_image: str) -> None:
    """A stage that finished while its daemon was gone is collected with its result and out files."""
    code = "import os, sys; open(os.path.join(sys.argv[1], 'result.json'), 'w').write('{}'); print('done')"
    spec = script_spec(code, image=trainer_image, labels=_labels())
    _wait_final(slurm_backend, _abandon(slurm_backend, spec))
    reaped = {run.name: run for run in slurm_backend.reap(lambda owner: False)}
    run = reaped[spec.name]
    assert run.action == "collected" and run.result is not None
    assert run.result.status is RunStatus.OK and run.result.files == {"result.json": b"{}"}
    assert "done" in run.result.output_tail
    assert not (slurm_backend.jobs_dir / spec.name).exists()


def test_running_job_of_a_dead_daemon_is_cancelled_as_interrupted(slurm_backend: SlurmBackend,
                                                                  slurm_cluster: SlurmCluster,
                                                                  script_spec: SpecFactory, trainer_image: str) -> None:
    """A stage still running without its daemon is cancelled and reported `interrupted`."""
    spec = script_spec("import time; time.sleep(300)", image=trainer_image, labels=_labels(), timeout_s=120)
    job_id = _abandon(slurm_backend, spec)
    reaped = {run.name: run for run in slurm_backend.reap(lambda owner: False)}
    killed = reaped[spec.name]
    assert killed.action == "killed" and killed.result is not None
    assert killed.result.status is RunStatus.INTERRUPTED
    assert slurm_backend.client.job(job_id).state == "CANCELLED"  # type: ignore[union-attr]


def test_running_job_of_a_live_daemon_is_left_alone(slurm_backend: SlurmBackend, script_spec: SpecFactory,
                                                    trainer_image: str) -> None:
    """Another live daemon's stage is not touched (its folder stays, its job runs on)."""
    spec = script_spec("import time; time.sleep(300)", image=trainer_image, labels=_labels(), timeout_s=120)
    job_id = _abandon(slurm_backend, spec)
    try:
        assert spec.name not in {run.name for run in slurm_backend.reap(lambda owner: owner == DEAD_OWNER)}
        assert (slurm_backend.jobs_dir / spec.name).exists()
        assert not slurm_backend.client.job(job_id).final  # type: ignore[union-attr]
    finally:
        slurm_backend.reap(lambda owner: False)


def test_queued_job_with_our_labels_but_no_folder_is_cancelled(slurm_backend: SlurmBackend,
                                                               script_spec: SpecFactory, trainer_image: str) -> None:
    """A job in the queue that carries our instance's labels but has no folder is cancelled ('removed')."""
    import shutil

    spec = script_spec("import time; time.sleep(300)", image=trainer_image, labels=_labels(), timeout_s=120)
    job_id = _abandon(slurm_backend, spec)
    shutil.rmtree(slurm_backend.jobs_dir / spec.name)
    reaped = {run.name: run for run in slurm_backend.reap(lambda owner: True)}
    assert reaped[spec.name].action == "removed"
    _wait_final(slurm_backend, job_id)
    assert slurm_backend.client.job(job_id).state == "CANCELLED"  # type: ignore[union-attr]


def test_orphan_never_outlives_its_time_limit(slurm_backend: SlurmBackend, script_spec: SpecFactory,
                                              trainer_image: str) -> None:
    """With no daemon watching, a stage over its limit is still ended on the node; the restart collects a timeout."""
    spec = script_spec("import time; print('sleeping', flush=True); time.sleep(300)", image=trainer_image,
                       labels=_labels(), timeout_s=3)
    _wait_final(slurm_backend, _abandon(slurm_backend, spec), timeout=90)
    run = {run.name: run for run in slurm_backend.reap(lambda owner: False)}[spec.name]
    assert run.action == "collected" and run.result is not None
    assert run.result.status is RunStatus.TIMEOUT and "sleeping" in run.result.output_tail
