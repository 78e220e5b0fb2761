"""Isolation backends that run untrusted candidate code: Docker (production) and local (development).

Threat model. The candidate `train.py` is written by an LLM that read untrusted text; treat it as
hostile but unprivileged code that wants to (a) fake a good result, (b) reach the network,
(c) damage or read the host, (d) exhaust shared resources, or (e) outlive its run.

Covered by the Docker backend:
- Faked results: metrics come only from the eval stage's `result.json`, written by the trusted harness
  in a second container that mounts the checkpoint read-only and the VAL split; the train stage never
  sees the VAL split. Printed summaries are informational.
- Network: `network_mode=none` (no interface but loopback: no egress, no DNS, no bridge gateway).
- Host filesystem: read-only root, data/trainer/candidate mounted read-only, only the per-run out dir
  writable; out files are read back with O_NOFOLLOW and size caps (symlinks and special files refused).
- Privilege: uid 1000, all capabilities dropped, no-new-privileges.
- Resources: memory limit equal to memory+swap (OOM reported as `oom`), CPU quota, finite pids limit
  (fork bombs), file-size ulimit, sized tmpfs and shm (they count against memory), capped json-file logs,
  exactly one GPU by UUID; a wall-clock limit enforced from outside (kill, then wait).
- Leftovers: every container carries instance/owner/experiment/stage/attempt labels and a deterministic
  name; it is removed after the run and the reaper reconciles what a crashed daemon left.

Not covered:
- Kernel, runc or NVIDIA driver exploits (container escape); use gVisor/Kata or a VM where that matters.
- GPU side channels and GPU memory left by a killed context (we wait for NVML to show it released and
  quarantine the GPU otherwise, but cannot scrub it).
- Timing-based covert channels, CPU cache side channels, and the page cache of the read-only mounts.
- Denial of service of the Docker engine itself through its API (the daemon alone talks to it).

The Slurm backend (a lab cluster) runs the very same container on the compute node's Docker engine,
one Slurm job per stage, so everything above holds on the node; in addition the job's time limit bounds
the run even if the daemon is gone. It trusts the cluster: the shared directory (job scripts, out dirs)
must be writable by the daemon's user only, and whoever administers Slurm or the nodes is trusted.

The local backend is a development fallback: separate session, network and PID namespaces where the
kernel allows (a warning says plainly when it does not), rlimits, kill of the whole namespace at the
limit. It has no mount namespace (the candidate can read whatever the daemon's user can, including the
VAL split if it knows the path), and RLIMIT_NPROC does not bind root: never run it on a shared server.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Literal

from sandbox.base import Backend
from sandbox.errors import BackendUnavailable

if TYPE_CHECKING:
    from sandbox.slurm import SlurmOptions


def docker_available() -> bool:
    """Whether a Docker engine answers here."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception:  # any failure means "no engine"
        return False
    return True


def open_backend(kind: Literal["auto", "docker", "local", "slurm"], image: str, instance: str,
                 slurm: SlurmOptions | None = None) -> Backend:
    """The backend for `kind` ("auto": Docker when it answers and has `image`, else local).

    "slurm" needs `slurm` and checks the cluster first (clients, partition, account, QoS, GRES through
    `sbatch --test-only`), so a bad setting is a clear `BackendUnavailable` before any run.
    """
    if kind == "slurm":
        if slurm is None:
            raise BackendUnavailable("the slurm backend needs its options ([slurm] settings)")
        from sandbox.slurm import SlurmBackend

        cluster = SlurmBackend(instance, slurm)
        cluster.check(image)
        return cluster
    if kind in ("auto", "docker"):
        if docker_available():
            from sandbox.docker_backend import DockerBackend

            backend = DockerBackend(instance)
            if backend.has_image(image):
                return backend
            backend.close()
            if kind == "auto":
                warnings.warn(f"Docker answers but has no image {image!r}: falling back to the local backend "
                              "(weaker isolation); run `autoresearch image build`", RuntimeWarning, stacklevel=2)
            else:
                raise BackendUnavailable(
                    f"trainer image {image!r} is not in the Docker engine: run `autoresearch image build` "
                    "(or `autoresearch image build --offline` on a machine without a registry)"
                )
        elif kind == "docker":
            raise BackendUnavailable("no Docker engine answers: start dockerd (`make services`) or use backend 'local'")
    if kind not in ("auto", "docker", "local"):
        raise BackendUnavailable(f"unknown sandbox backend {kind!r}: use 'auto', 'docker', 'local' or 'slurm'")
    from sandbox.local_backend import LocalBackend

    return LocalBackend(instance)

