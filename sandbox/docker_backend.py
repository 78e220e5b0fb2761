"""The production backend: one hardened Docker container per stage, killed from outside at its limit."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.types import DeviceRequest, LogConfig, Ulimit
from docker.types import Mount as DockerMount

from sandbox import labels as L
from sandbox import treewalk
from sandbox.base import ReapedRun
from sandbox.errors import BackendUnavailable
from sandbox.outfiles import prepare_out_dir, read_out_files
from sandbox.spec import (
    MODEL_UID,
    PRIVATE_DIR,
    SANDBOX_UID,
    WORK_DIR,
    WORK_ENV,
    Cancel,
    RunResult,
    RunSpec,
    RunStatus,
    exit_status,
)
from sandbox.tail import sanitize_tail

SANDBOX_USER = f"{SANDBOX_UID}:{SANDBOX_UID}"
PRIVSEP_ENV = "AUTORESEARCH_PRIVSEP"  # read by trainer.privsep
# What a split stage's root starts with: switching uids, and for the train stage's harness, killing the
# candidate's processes, taking the out dir for itself (chown) and reading the candidate's work dir whatever the
# candidate did to its permissions.
SPLIT_CAPABILITIES = ("SETUID", "SETGID", "KILL", "DAC_OVERRIDE", "FOWNER", "CHOWN")
WORK_INODES = 10_000  # files and folders in the work tmpfs (as the harness's entry quota)
# How often a waiting run checks its Cancel; the wait itself returns at once when the container exits.
POLL_SECONDS = 0.5
KILL_WAIT_SECONDS = 30.0
# docker json-file keeps at most this much output per container; the tail is cut from it.
LOG_MAX_SIZE = "8m"
LOG_TAIL_LINES = 400
WAIT_ERRORS = (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError)


def image_exists(client: Any, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def _connect(timeout: float = 60.0) -> Any:
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except Exception as exc:
        raise BackendUnavailable(
            f"no Docker engine answers ({type(exc).__name__}: {exc}); start dockerd or use backend 'local'"
        ) from None
    return client


def _kill_and_wait(container: Any) -> None:
    # APIError: it exited between our deadline and the kill; a wait error: the caller force-removes it.
    with contextlib.suppress(docker.errors.APIError):
        container.kill()
    with contextlib.suppress(*WAIT_ERRORS):
        container.wait(timeout=KILL_WAIT_SECONDS)


def collect_result(container: Any, out_dir: Path, tail_bytes: int, wall_seconds: float,
                   killed_as: RunStatus | None) -> RunResult:
    """Read an exited container's state, output tail and out files into a `RunResult`."""
    container.reload()
    state = container.attrs.get("State", {})
    exit_code = state.get("ExitCode")
    oom = bool(state.get("OOMKilled"))
    try:
        logs = container.logs(stdout=True, stderr=True, tail=LOG_TAIL_LINES)
    except docker.errors.APIError:
        logs = b""
    out = read_out_files(out_dir)
    return RunResult(
        status=exit_status(killed_as, oom, exit_code),
        exit_code=exit_code,
        wall_seconds=wall_seconds,
        output_tail=sanitize_tail(logs, tail_bytes),
        files=out.files,
        oom_killed=oom,
        error=out.describe_refused(),
    )


def _identities(spec: RunSpec) -> dict[str, Any]:
    """The user, capabilities, private tmpfs and environment of a run: one uid, or split (RunSpec.split_identities).

    A split stage starts as root holding only SPLIT_CAPABILITIES (no-new-privileges still set, so nothing gains
    more through exec). trainer.privsep runs the untrusted part as MODEL_UID (every capability gone with the
    uid); the train stage's harness stays root to keep its clock and its kill out of the candidate's reach, the
    eval stage's scorer drops to SANDBOX_UID. PRIVATE_DIR is a mode-0700 tmpfs of SANDBOX_UID: the mounts under
    it (the val split, the scorer's out dir) are out of MODEL_UID's reach whatever their own permissions."""
    if not spec.split_identities:
        return {"user": SANDBOX_USER, "cap_add": [], "tmpfs": {}, "environment": {}}
    tmpfs = {PRIVATE_DIR: f"rw,noexec,nosuid,nodev,size=1m,mode=0700,uid={SANDBOX_UID},gid={SANDBOX_UID}"}
    environment = {PRIVSEP_ENV: f"{SANDBOX_UID}:{MODEL_UID}"}
    if spec.limits.work_bytes > 0:
        # The untrusted side's only writable folder that outlives a process: a tmpfs whose size is its quota
        # (unlinked-but-open files included), charged to the container's memory (container_config adds it).
        tmpfs[WORK_DIR] = (f"rw,noexec,nosuid,nodev,size={spec.limits.work_bytes},nr_inodes={WORK_INODES},mode=0700,"
                           f"uid={MODEL_UID},gid={MODEL_UID}")
        environment[WORK_ENV] = WORK_DIR
    return {"user": "0:0", "cap_add": list(SPLIT_CAPABILITIES), "tmpfs": tmpfs, "environment": environment}


def container_config(spec: RunSpec, instance: str) -> dict[str, Any]:
    """The container of one run with every hardening flag (the docker SDK's `containers.create` keywords).

    The one place the hardening is listed: the docker backend creates it through the SDK, the Slurm
    backend renders the same keywords as a `docker run` command line for the compute node.
    """
    limits = spec.limits
    spec.check_mounts()
    mounts = [
        DockerMount(target=m.target, source=str(m.source.resolve()), type="bind", read_only=not m.writable)
        for m in spec.mounts
    ]
    device_requests = []
    if spec.gpu_uuid is not None:
        # Exactly this GPU, by UUID: never count=-1 ("all").
        device_requests.append(DeviceRequest(driver="nvidia", device_ids=[spec.gpu_uuid], capabilities=[["gpu"]]))
    identities = _identities(spec)
    # tmpfs pages are charged to the memory cgroup: the work tmpfs comes on top of the run's own memory.
    memory = limits.memory_bytes + (limits.work_bytes if WORK_DIR in identities["tmpfs"] else 0)
    run_labels = {**spec.labels, L.INSTANCE: spec.labels.get(L.INSTANCE, instance),
                  L.DEADLINE: L.deadline_label(limits.timeout_s, L.DEADLINE_MARGIN_S)}
    return {
        "image": spec.image,
        # The run's own deadline, enforced inside the container even if the daemon never comes back:
        # `timeout` is PID 1 there, which the run cannot kill (SIGKILL/SIGSTOP from inside its PID
        # namespace do not reach it); when it exits, the kernel kills every process of the container.
        "command": L.deadline_command(list(spec.command), limits.timeout_s),
        "name": spec.name,
        # Base images such as pytorch/pytorch set NVIDIA_VISIBLE_DEVICES=all, which the nvidia
        # runtime honours over device_requests: pin it to this run's GPU, or to none.
        "environment": {**spec.env, **identities["environment"], "NVIDIA_VISIBLE_DEVICES": spec.gpu_uuid or "void"},
        "working_dir": spec.workdir,
        "user": identities["user"],
        "labels": run_labels,
        "mounts": mounts,
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {"/tmp": f"rw,exec,nosuid,nodev,size={limits.tmpfs_bytes},uid={SANDBOX_UID},gid={SANDBOX_UID}",
                  **identities["tmpfs"]},
        "cap_drop": ["ALL"],
        "cap_add": identities["cap_add"],
        "security_opt": ["no-new-privileges"],
        "pids_limit": limits.pids,
        "mem_limit": memory,
        "memswap_limit": memory,
        "nano_cpus": int(limits.cpus * 1e9),
        "shm_size": limits.shm_bytes,
        "ulimits": [
            Ulimit(name="fsize", soft=limits.out_file_max_bytes, hard=limits.out_file_max_bytes),
            Ulimit(name="nofile", soft=4096, hard=4096),
            Ulimit(name="core", soft=0, hard=0),
        ],
        "log_config": LogConfig(type="json-file", config={"max-size": LOG_MAX_SIZE, "max-file": "1"}),
        "device_requests": device_requests,
        "detach": True,
    }


class DockerBackend:
    """Runs each `RunSpec` in its own container with the hardening listed in the sandbox docstring."""

    name = "docker"

    def __init__(self, instance: str, client: Any = None) -> None:
        self.instance = instance
        self.client = client if client is not None else _connect()

    # --- container configuration -------------------------------------------------------------------

    def _create_kwargs(self, spec: RunSpec) -> dict[str, Any]:
        return container_config(spec, self.instance)

    def _create(self, spec: RunSpec) -> Any:
        kwargs = self._create_kwargs(spec)
        try:
            return self.client.containers.create(**kwargs)
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
        # The deterministic name exists: a retry after a crash. The leftover (never started, or a stale
        # run the reaper already had its chance to collect) may carry a dead owner's labels and old
        # limits, so it is replaced rather than reused.
        self.client.containers.get(spec.name).remove(force=True)
        return self.client.containers.create(**kwargs)

    # --- running ---------------------------------------------------------------------------------

    def run(self, spec: RunSpec, cancel: Cancel | None = None) -> RunResult:
        out_dir = spec.out_mount().source
        prepare_out_dir(out_dir, *spec.out_owner())
        started = time.monotonic()
        container = None
        try:
            try:
                container = self._create(spec)
                container.start()
            except docker.errors.ImageNotFound:
                return RunResult(RunStatus.INFRA_ERROR, None, time.monotonic() - started,
                                 error=f"image {spec.image!r} not found: run `autoresearch image build`")
            except (docker.errors.APIError, *WAIT_ERRORS) as exc:
                return RunResult(RunStatus.INFRA_ERROR, None, time.monotonic() - started,
                                 error=f"container {spec.name} did not start: {exc}")
            killed_as = self._wait(container, spec.limits.timeout_s, started, cancel)
            result = collect_result(container, out_dir, spec.limits.output_tail_bytes,
                                    time.monotonic() - started, killed_as)
            if L.wrapper_could_not_exec(result.exit_code, result.output_tail):
                return RunResult(RunStatus.INFRA_ERROR, None, result.wall_seconds,
                                 error=f"container {spec.name} did not start: {result.output_tail.strip()[:300]}")
            return result
        finally:
            if container is not None:
                self._remove(container)

    def _wait(self, container: Any, timeout_s: float, started: float, cancel: Cancel | None) -> RunStatus | None:
        """Wait for exit; on the deadline or a cancel, kill and return the status the run ends with."""
        deadline = started + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill_and_wait(container)
                return RunStatus.TIMEOUT
            if cancel is not None and cancel.reason is not None:
                _kill_and_wait(container)
                return cancel.reason
            try:
                container.wait(timeout=max(0.1, min(POLL_SECONDS, remaining)))
                return None
            except WAIT_ERRORS:
                continue

    def _remove(self, container: Any) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)

    # --- reconciliation ------------------------------------------------------------------------------

    def reap(self, owner_alive: Callable[[str], bool]) -> list[ReapedRun]:
        from sandbox.reaper import reap_containers

        return reap_containers(self.client, self.instance, owner_alive)

    def active_pids(self) -> set[int]:
        """Host PIDs inside this instance's running containers (`docker top` lists them as the host sees them)."""
        running = self.client.containers.list(filters={"label": f"{L.INSTANCE}={self.instance}", "status": "running"})
        pids: set[int] = set()
        for container in running:
            try:
                top = container.top()
            except docker.errors.APIError:  # it exited between the listing and the look inside
                continue
            titles = top.get("Titles") or []
            if "PID" not in titles:
                continue
            column = titles.index("PID")
            pids.update(int(row[column]) for row in top.get("Processes") or [] if str(row[column]).isdigit())
        return pids

    def purge(self, folder: Path, image: str) -> None:
        """Empty `folder` from a container running as root with only DAC_OVERRIDE and FOWNER, for what the
        sandbox uids left behind and the daemon's own user may not remove (folders chmod 000, files in sticky
        folders, the harness's root-owned files); the caller removes the rest."""
        # The script is sandbox/treewalk.py itself: iterative and descriptor-based, so no depth or shape of tree
        # can make it fail (an os.walk/shutil.rmtree script recursed and died on a deep folder chain).
        script = Path(treewalk.__file__).read_text()
        with contextlib.suppress(docker.errors.ContainerError):
            self.client.containers.run(
                image, ["python3", "-c", script, "/purge"], user="0:0", network_mode="none", remove=True,
                cap_drop=["ALL"], cap_add=["DAC_OVERRIDE", "FOWNER"], security_opt=["no-new-privileges"],
                mounts=[DockerMount(target="/purge", source=str(folder.resolve()), type="bind")],
                labels={L.INSTANCE: self.instance})

    def has_image(self, image: str) -> bool:
        return image_exists(self.client, image)

    def close(self) -> None:
        self.client.close()
