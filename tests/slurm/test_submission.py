"""The generated submission without a cluster: sbatch options (GPU GRES included), the batch script, states."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import pytest
from docker.types import Ulimit

from sandbox.errors import InvalidSpec
from sandbox.slurm import SlurmBackend, SlurmOptions
from sandbox.slurm.backend import job_comment, parse_comment, time_limit_minutes
from sandbox.slurm.script import _render, batch_script, docker_run_argv
from sandbox.slurm.states import JobInfo, StageStatus, parse_status, stage_outcome
from sandbox.spec import Limits, Mount, RunSpec, RunStatus


def _spec(tmp_path: Path, timeout_s: float = 400.0) -> RunSpec:
    (tmp_path / "candidate").mkdir(exist_ok=True)
    (tmp_path / "out").mkdir(exist_ok=True)
    return RunSpec(name="autoresearch-lab-7-1-train", command=("python3", "-m", "trainer.harness", "train"),
                   image="autoresearch-trainer:latest",
                   mounts=(Mount(tmp_path / "candidate", "/candidate"), Mount(tmp_path / "out", "/out", True)),
                   env={"AUTORESEARCH_SEED": "3"}, limits=Limits(timeout_s=timeout_s, cpus=4, memory_bytes=16 * 1024**3),
                   labels={"autoresearch.experiment": "7", "autoresearch.stage": "train",
                           "autoresearch.owner": "lab:42"})


def _backend(tmp_path: Path, **options: object) -> SlurmBackend:
    values: dict[str, object] = {"shared_dir": tmp_path, "partition": "gpu", "qos": "harvest", "account": "ml",
                                 "gres": "gpu:1"}
    values.update(options)
    return SlurmBackend("lab", SlurmOptions(**values))  # type: ignore[arg-type]


def test_gpu_submission_asks_for_one_gpu_with_gres(tmp_path: Path) -> None:
    """With gres configured, sbatch gets --gres=gpu:1 plus partition, QoS, account, time and no requeue."""
    options = _backend(tmp_path).sbatch_options(_spec(tmp_path), tmp_path / "job")
    assert "--gres=gpu:1" in options
    assert {"--partition=gpu", "--qos=harvest", "--account=ml", "--no-requeue", "--cpus-per-task=4",
            "--mem=16384M", "--job-name=autoresearch-lab-7-1-train"} <= set(options)
    assert "--time=9" in options  # (400 s + 120 s slack) / 60, rounded up


def test_memory_request_covers_the_work_tmpfs(tmp_path: Path) -> None:
    """A split train stage's work tmpfs is charged to the container's memory: Slurm's --mem includes it."""
    from dataclasses import replace

    spec = _spec(tmp_path)
    spec = replace(spec, limits=replace(spec.limits, work_bytes=2 * 1024**3))
    options = _backend(tmp_path).sbatch_options(spec, tmp_path / "job")
    assert "--mem=18432M" in options


def test_cpu_submission_has_no_gres(tmp_path: Path) -> None:
    """An empty gres (a CPU cluster) submits no GPU request at all."""
    options = _backend(tmp_path, gres="").sbatch_options(_spec(tmp_path), tmp_path / "job")
    assert not [o for o in options if o.startswith("--gres")]


def test_gpu_script_runs_the_container_on_the_gpu_slurm_allocated(tmp_path: Path) -> None:
    """The container gets exactly the job's GPU ($SLURM_JOB_GPUS) as device and as NVIDIA_VISIBLE_DEVICES."""
    script = batch_script(_spec(tmp_path), "lab", tmp_path / "job", gpu=True)
    assert '--gpus \\\n    device="${SLURM_JOB_GPUS:?' in script
    assert 'NVIDIA_VISIBLE_DEVICES="${SLURM_JOB_GPUS:?' in script
    assert "SLURM-ALLOCATED-GPU" not in script


def test_cpu_script_hides_every_gpu(tmp_path: Path) -> None:
    """Without a GPU the container has no --gpus and NVIDIA_VISIBLE_DEVICES=void."""
    argv = docker_run_argv(_spec(tmp_path), "lab", gpu=False)
    assert "--gpus" not in argv and "NVIDIA_VISIBLE_DEVICES=void" in argv


def test_script_carries_the_docker_backend_hardening(tmp_path: Path) -> None:
    """The node's `docker run` has the docker backend's hardening: no network, read-only, no caps, uid 1000, caps."""
    argv = docker_run_argv(_spec(tmp_path), "lab", gpu=False)
    pairs = set(itertools.pairwise(argv))
    for pair in (("--network", "none"), ("--cap-drop", "ALL"), ("--security-opt", "no-new-privileges"),
                 ("--user", "1000:1000"), ("--memory", f"{16 * 1024**3}b"), ("--memory-swap", f"{16 * 1024**3}b"),
                 ("--cpus", "4"), ("--log-driver", "json-file")):
        assert pair in pairs, pair
    assert "--read-only" in argv and "--pids-limit" in argv and "--detach" in argv
    assert any(a.startswith("type=bind,source=") and a.endswith("target=/candidate,readonly") for a in argv)
    assert any(a.endswith("target=/out") for a in argv)


def test_script_is_valid_bash(tmp_path: Path) -> None:
    """`bash -n` accepts the generated script, GPU form included."""
    path = tmp_path / "job.sh"
    path.write_text(batch_script(_spec(tmp_path), "lab", tmp_path / "job", gpu=True))
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_unknown_container_keyword_is_refused() -> None:
    """A docker keyword the renderer does not know is an error, never a silently dropped hardening flag."""
    with pytest.raises(InvalidSpec, match="privileged"):
        _render("privileged", False)


def test_ulimits_render_as_soft_and_hard() -> None:
    """Ulimits keep both values."""
    assert _render("ulimits", [Ulimit(name="fsize", soft=5, hard=7)]) == ["--ulimit", "fsize=5:7"]


def test_mount_path_with_a_comma_is_refused(tmp_path: Path) -> None:
    """A path that `--mount`'s CSV syntax would split is refused instead of mounting something else."""
    odd = tmp_path / "a,target=etc"
    odd.mkdir()
    (tmp_path / "out").mkdir()
    spec = RunSpec(name="x", command=("true",), image="img", mounts=(Mount(odd, "/candidate"),
                                                                      Mount(tmp_path / "out", "/out", True)))
    with pytest.raises(InvalidSpec, match="comma"):
        docker_run_argv(spec, "lab", gpu=False)


def test_comment_labels_cannot_inject_options() -> None:
    """Label values with spaces, commas or quotes are neutralized in --comment and still parse back."""
    comment = job_comment({"autoresearch.experiment": "7 --partition=x,evil='1'"})
    assert " " not in comment and "'" not in comment
    assert parse_comment(comment) == {"autoresearch.experiment": "7---partition=x-evil=-1-"}


def test_time_limit_rounds_up_to_whole_minutes() -> None:
    """--time covers the stage's limit plus the slack, in whole minutes, at least one."""
    assert time_limit_minutes(1, 0) == 1 and time_limit_minutes(61, 0) == 2 and time_limit_minutes(300, 120) == 7


@pytest.mark.parametrize(("state", "expected"), [
    ("TIMEOUT", RunStatus.TIMEOUT), ("DEADLINE", RunStatus.TIMEOUT), ("PREEMPTED", RunStatus.PREEMPTED),
    ("OUT_OF_MEMORY", RunStatus.OOM), ("CANCELLED", RunStatus.PREEMPTED), ("NODE_FAIL", RunStatus.INFRA_ERROR),
    ("BOOT_FAIL", RunStatus.INFRA_ERROR),
])
def test_slurm_states_map_onto_run_statuses(state: str, expected: RunStatus) -> None:
    """Slurm's verdict decides for time limit, preemption, memory, outside cancel and node failure."""
    assert stage_outcome(JobInfo("1", state), StageStatus(phase="done", exit_code=0))[0] is expected


@pytest.mark.parametrize(("status_text", "expected"), [
    ("phase=done\nstate=0 false", RunStatus.OK), ("phase=done\nstate=3 false", RunStatus.FAILED),
    ("phase=done\nstate=137 true", RunStatus.OOM), ("phase=done\ntimed_out=1\nstate=137 false", RunStatus.TIMEOUT),
    ("phase=start-failed\nerror=no such image", RunStatus.INFRA_ERROR), ("", RunStatus.INFRA_ERROR),
    ("phase=done\nlost_wait=1\nstate=0 false", RunStatus.INFRA_ERROR),
])
def test_completed_job_maps_by_the_containers_status(status_text: str, expected: RunStatus) -> None:
    """A COMPLETED job ends by the container's own exit code, OOM flag and exact time limit."""
    assert stage_outcome(JobInfo("1", "COMPLETED"), parse_status(status_text))[0] is expected


def test_requeued_job_is_recognized() -> None:
    """A job Slurm requeued (state or restart count) is seen as requeued, so the backend ends it."""
    assert JobInfo("1", "PENDING", restarts=1).requeued and JobInfo("1", "REQUEUED").requeued
    assert not JobInfo("1", "RUNNING").requeued


def test_mounts_outside_the_shared_paths_are_refused(tmp_path: Path) -> None:
    """Folders the nodes would not see are refused before any run, naming them."""
    from sandbox.errors import BackendUnavailable

    backend = _backend(tmp_path / "shared", node_paths=(tmp_path / "data",))
    with pytest.raises(BackendUnavailable, match="/elsewhere"):
        backend.require_shared([tmp_path / "data" / "train", Path("/elsewhere")])
