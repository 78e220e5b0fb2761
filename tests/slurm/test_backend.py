"""The Slurm backend against the suite's real cluster, running the offline trainer image on this node's Docker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import docker
import pytest

from sandbox.errors import BackendUnavailable
from sandbox.slurm import SlurmBackend
from sandbox.spec import Cancel, RunSpec, RunStatus
from tests.slurm.conftest import slurm_options
from tests.slurmcluster import HARVEST_PARTITION, OWNERS_PARTITION, SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.docker]
SpecFactory = Callable[..., RunSpec]

PROBE = """
import os, sys
print("uid", os.getuid())
print("ifaces", sorted(os.listdir("/sys/class/net")))
try:
    open("/usr/evil", "w")
except OSError as e:
    print("denied /usr/evil", e.errno)
open(os.path.join(sys.argv[1], "result.json"), "w").write('{"ok": 1}')
"""


def _containers(name: str) -> list[object]:
    client = docker.from_env()
    try:
        return list(client.containers.list(all=True, filters={"name": name}))
    finally:
        client.close()


def _wait_for_state(cluster: SlurmCluster, name: str, state: str, timeout: float = 60) -> str:
    """The id of job `name` once squeue shows it in `state`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in cluster.run("squeue", "-h", "-o", "%i %j %T").stdout.splitlines():
            job_id, job_name, job_state = line.split()
            if job_name == name and job_state == state:
                return job_id
        time.sleep(0.3)
    raise AssertionError(f"job {name} never reached {state}:\n{cluster.run('squeue').stdout}")


def _running_in_container(spec: RunSpec, marker: str, timeout: float = 60) -> None:
    """Block until the stage's container printed `marker` (the candidate is really running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for container in _containers(spec.name):
            if marker in container.logs().decode(errors="replace"):  # type: ignore[attr-defined]
                return
        time.sleep(0.3)
    raise AssertionError(f"{spec.name} never printed {marker!r}")


def test_stage_runs_as_a_job_in_the_hardened_container(slurm_backend: SlurmBackend, script_spec: SpecFactory,
                                                       trainer_image: str) -> None:
    """A job runs the stage as uid 1000 with loopback only and a read-only root; its out file comes back."""
    spec = script_spec(PROBE, image=trainer_image)
    result = slurm_backend.run(spec)
    assert result.status is RunStatus.OK, (result.error, result.output_tail)
    assert "uid 1000" in result.output_tail and "ifaces ['lo']" in result.output_tail
    assert "denied /usr/evil 30" in result.output_tail
    assert result.files == {"result.json": b'{"ok": 1}'}
    assert result.exit_code == 0 and result.wall_seconds > 0
    assert _containers(spec.name) == [] and not (slurm_backend.jobs_dir / spec.name).exists()


def test_non_zero_exit_is_failed(slurm_backend: SlurmBackend, script_spec: SpecFactory, trainer_image: str) -> None:
    """A candidate that exits 3 ends `failed` with exit code 3 and its output tail."""
    result = slurm_backend.run(script_spec("print('boom'); raise SystemExit(3)", image=trainer_image))
    assert result.status is RunStatus.FAILED and result.exit_code == 3
    assert "boom" in result.output_tail


def test_stage_over_its_time_limit_is_timeout(slurm_backend: SlurmBackend, script_spec: SpecFactory,
                                              trainer_image: str) -> None:
    """A stage still running at its limit is killed on the node and reported `timeout`."""
    spec = script_spec("import time; print('sleeping', flush=True); time.sleep(300)", image=trainer_image,
                       timeout_s=3)
    result = slurm_backend.run(spec)
    assert result.status is RunStatus.TIMEOUT, (result.error, result.output_tail)
    assert "sleeping" in result.output_tail
    assert _containers(spec.name) == []


def test_symlinked_out_file_is_refused(slurm_backend: SlurmBackend, script_spec: SpecFactory,
                                       trainer_image: str) -> None:
    """Out files come back with the same rules: a symlink planted by the candidate is not followed."""
    code = "import os, sys; os.symlink('/etc/passwd', os.path.join(sys.argv[1], 'result.json'))"
    result = slurm_backend.run(script_spec(code, image=trainer_image))
    assert result.status is RunStatus.OK
    assert "result.json" not in result.files and "symlink refused" in result.error


def test_daemon_cancel_ends_the_job_with_the_cancel_reason(slurm_backend: SlurmBackend, script_spec: SpecFactory,
                                                           trainer_image: str) -> None:
    """Setting the run's Cancel (a stop, a foreign job) scancels the job; the container is gone afterwards."""
    spec = script_spec("import time; print('started', flush=True); time.sleep(300)", image=trainer_image,
                       timeout_s=120)
    cancel = Cancel()

    def stop_when_running() -> None:
        _running_in_container(spec, "started")
        cancel.set(RunStatus.INTERRUPTED)

    threading.Thread(target=stop_when_running, daemon=True).start()
    result = slurm_backend.run(spec, cancel)
    assert result.status is RunStatus.INTERRUPTED
    assert _containers(spec.name) == []


def test_job_cancelled_outside_the_daemon_is_preempted(slurm_backend: SlurmBackend, slurm_cluster: SlurmCluster,
                                                       script_spec: SpecFactory, trainer_image: str) -> None:
    """An administrator's scancel mid-run ends the stage `preempted` (its experiment is requeued), not crashed."""
    spec = script_spec("import time; print('started', flush=True); time.sleep(300)", image=trainer_image,
                       timeout_s=120)

    def cancel_from_outside() -> None:
        _running_in_container(spec, "started")
        slurm_cluster.run("scancel", _wait_for_state(slurm_cluster, spec.name, "RUNNING"))

    threading.Thread(target=cancel_from_outside, daemon=True).start()
    result = slurm_backend.run(spec)
    assert result.status is RunStatus.PREEMPTED, (result.error, result.output_tail)
    assert "cancelled outside the daemon" in result.error
    assert _containers(spec.name) == []


def test_preempted_harvest_job_is_preempted_and_never_requeued(slurm_cluster: SlurmCluster, script_spec: SpecFactory,
                                                               trainer_image: str,
                                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    """A job in the preemptible partition that an owner's job preempts ends `preempted`; Slurm does not rerun it."""
    backend = SlurmBackend("test-slurm-harvest", slurm_options(
        slurm_cluster, tmp_path_factory.getbasetemp(), partition=HARVEST_PARTITION, account=""))
    spec = script_spec("import time; print('started', flush=True); time.sleep(300)", image=trainer_image,
                       timeout_s=120)
    owner_script = slurm_cluster.shared / "owner.sh"
    owner_script.write_text("#!/bin/sh\nsleep 5\n")

    def owner_arrives() -> None:
        _running_in_container(spec, "started")
        slurm_cluster.run("sbatch", "--parsable", f"--partition={OWNERS_PARTITION}", "--cpus-per-task=2",
                          "--job-name=owner", f"--output={slurm_cluster.shared / 'owner.out'}", str(owner_script))

    threading.Thread(target=owner_arrives, daemon=True).start()
    result = backend.run(spec)
    assert result.status is RunStatus.PREEMPTED, (result.error, result.output_tail)
    assert _containers(spec.name) == []
    queued = slurm_cluster.run("squeue", "-h", "-o", "%j").stdout.split()
    assert spec.name not in queued


def test_unknown_partition_is_a_clear_error_before_any_run(slurm_cluster: SlurmCluster,
                                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    """A partition the cluster does not have is refused by `check` with the partition's name."""
    backend = SlurmBackend("test-slurm-bad", slurm_options(slurm_cluster, tmp_path_factory.getbasetemp(),
                                                           partition="no-such-partition"))
    with pytest.raises(BackendUnavailable, match="no-such-partition"):
        backend.check()


def test_account_not_allowed_is_a_clear_error_before_any_run(slurm_cluster: SlurmCluster,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """An account the partition does not allow is refused by `check` in the cluster's own words."""
    backend = SlurmBackend("test-slurm-bad", slurm_options(slurm_cluster, tmp_path_factory.getbasetemp(),
                                                           account="intruders"))
    with pytest.raises(BackendUnavailable, match=r"refuses the submission.*account"):
        backend.check()


def test_good_settings_pass_the_check(slurm_backend: SlurmBackend) -> None:
    """The cluster accepts the configured partition and account; `check` describes the partition."""
    assert slurm_backend.check().startswith("partition normal (UP")


def test_candidate_cannot_forge_the_stage_verdict(slurm_backend: SlurmBackend, script_spec: SpecFactory,
                                                  trainer_image: str) -> None:
    """A candidate that writes a fake status file and looks for the job folder still ends `failed` by its exit."""
    code = f"""
import os, sys
forged = "phase=done\\nstate=0 false\\n"
open(os.path.join(sys.argv[1], "status"), "w").write(forged)
jobs = {str(slurm_backend.jobs_dir)!r}
print("job folder visible", os.path.exists(jobs))
for path in (jobs, "/status"):
    try:
        open(os.path.join(path, "status") if path == jobs else path, "w").write(forged)
        print("wrote", path)
    except OSError as e:
        print("denied", path, e.errno)
raise SystemExit(7)
"""
    result = slurm_backend.run(script_spec(code, image=trainer_image))
    assert result.status is RunStatus.FAILED and result.exit_code == 7, (result.error, result.output_tail)
    assert "job folder visible False" in result.output_tail and "wrote" not in result.output_tail


def test_output_flood_is_capped(slurm_backend: SlurmBackend, script_spec: SpecFactory, trainer_image: str) -> None:
    """A candidate printing tens of megabytes (escape sequences included) yields a short, sanitized tail."""
    code = "import sys\nfor _ in range(400000): sys.stdout.write('\\x1b[31mflood\\x07' * 16 + '\\n')\nprint('end')"
    spec = script_spec(code, image=trainer_image)
    result = slurm_backend.run(spec)
    assert result.status is RunStatus.OK, result.error
    assert len(result.output_tail.encode()) <= spec.limits.output_tail_bytes
    assert "\x1b" not in result.output_tail and "\x07" not in result.output_tail and "end" in result.output_tail
