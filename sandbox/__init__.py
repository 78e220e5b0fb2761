"""Isolation backends that run untrusted candidate code: Docker (production) and local (development).

Threat model. The candidate `train.py` is written by an LLM that read untrusted text; treat it as
hostile but unprivileged code that wants to (a) fake a good result, (b) reach the network,
(c) damage or read the host, (d) exhaust shared resources, or (e) outlive its run.

Covered by the Docker backend:
- Faked results (issue #11): metrics come only from the eval stage's `result.json`, written by the trusted
  harness in a second container that mounts the checkpoint read-only and the VAL split; the train stage
  never sees the VAL split's files. Printed summaries are informational. Against a candidate that wants a
  val_bpb its model did not earn:
  * the candidate's program never runs in the scorer's process. The eval container starts as root holding only
    CAP_SETUID/CAP_SETGID (no-new-privileges); the harness first starts the model process (trainer.inference)
    as MODEL_UID 1001, then drops itself to SANDBOX_UID 1000 for good (trainer.privsep), and only then reads
    the VAL split and opens its out dir, both mounted under PRIVATE_DIR (/scorer), a mode-0700 tmpfs of uid
    1000. The model process gets a sealed in-memory copy of the validated checkpoint and, per batch, only the
    input rows (never their last target) through buffers the scorer owns (host shared memory, or on CUDA device
    memory shared by a VMM descriptor, trainer.transport); it cannot read the split, the scorer's memory,
    environment or descriptors, signal the scorer, write the out dir or regain root (a red-team test runs hostile
    code in its place and checks each). The scorer keeps the targets, the probe randomness and the sums, copies
    each answer before the next call, and bounds and cleans whatever the process says; a dead, silent or lying
    process makes the checkpoint `invalid`. So a program that escaped torch's kernels could at worst return
    wrong logits for the inputs it is given;
  * the checkpoint is data until validated by allow-list before torch.export.load reads it
    (trainer.checkpoint_check): pure ATen ops only (no file I/O such as from_file, no randomness, no in-place,
    out= or higher-order ops), every symbolic-shape string in a strict integer-arithmetic grammar (torch
    would hand it to sympy, which evaluates Python), no mutated buffers or inputs (no state across calls),
    size and node caps; unpickling is refused during the load;
  * every scored row is probed: each scoring batch has a same-shape twin (rows re-ordered, each cut at an
    unpredictable point, column 0 and the last position included) run in a random order through the same
    call; log-probabilities that the cut must not affect may drift 1e-3 nats at most, else `invalid`. A
    one-token look-ahead at a fraction f of positions escapes with probability (1 - 3f/4)^R over R scored rows
    (trainer/probe_power.py, checked by Monte-Carlo against this probe); the daemon never runs a full eval
    under the floor of 612 rows (f = 1% caught with probability >= 0.99): it enlarges the eval, refuses an
    explicit smaller one at start-up, and the eval stage refuses (exit 18, infra_error) when the val split
    yields fewer rows. Smoke evals are below the floor and are not a trust check;
  * the harness owns time with one clock (issue #21, trainer.clock): every second from its spawn of the
    candidate counts, and every candidate gets the same compile allowance + budget + a 2% slack (>= 1 s); a
    candidate still running then is killed and `timeout`, whatever lines it printed, so no candidate gets
    more wall-clock of computation than another (training during start-up or after an early export line only
    spends the same allowance). At its exit or deadline every process of its uid dies first (a helper with
    that uid calls kill(-1, SIGKILL) until /proc shows none: setsid and double forks included; the pids limit
    bounds the fork race), then the checkpoint is copied into the harness's out dir: nothing of the candidate
    runs while the harness cleans up, and the clean-up's length decides nothing. The daemon bounds the train
    container's wall time from outside. The train container is split too: the candidate runs as MODEL_UID 1001
    under the harness, which stays the container's root with only SETUID, SETGID, KILL, DAC_OVERRIDE, FOWNER
    and CHOWN, so the candidate cannot signal it, read or patch its memory (its clock, its exit status), or
    touch its report (the out dir is root's, mode 0755, from before the spawn);
  * a scored result bit-identical (checkpoint SHA-256 or exact val_bpb) to the same source's run under
    another seed is refused as a replay (daemon.research.replay), so noise-floor and confirmation runs stay real;
  * everything that leaves the sandbox (file names, summary numbers, output and error text) and the agent's
    descriptions pass sandbox.sanitize before the store, git, prompts, the status page or a terminal;
  * every candidate-derived text in the agent's prompt (the best train.py, diffs, descriptions, hypotheses,
    crash text, log lines, the notebook, the idea memory) is inside the research line's data fence: a tag
    named by a secret nonce kept in the store (never shown to a candidate), which the text cannot contain or
    close (daemon.agents.fences), under a system note that fenced text is data, never instructions;
  * the val split is unreadable from the train stage for every source, the embedded `stdlib` one included
    (its val documents come only from stdlib parts absent from the trainer image whatever its base);
  * disk: the train stage's candidate writes only tmpfs mounts (its work dir /work, sized from the checkpoint's
    cap and the out quota, with 10 000 inodes; /tmp; /dev/shm), whose sizes the kernel enforces, files unlinked
    while open included, and which are charged to the container's memory limit (the work dir's size is added
    to it). The host disk gets only the checkpoint the harness copies out and its reports. The harness also
    polls the total quota (bytes and entries; the daemon measures the out dir again), and clean-up survives
    any permissions the sandbox left (remove_tree, then a purge container running as the sandbox uid).
  * no shape of tree a candidate leaves can end the session: every walk over one (out files, out dir size,
    removal, purge container, compile-cache copy, harness clean-up, local TMPDIR, Slurm job folders) is
    sandbox.treewalk / trainer.treewalk: a loop over folder descriptors (no recursion, no path longer than a
    name, no link followed, no FIFO/socket/device opened, names as raw bytes), bounded in depth, entries, name
    and path length where it reads (past them: one `crashed` run with a one-line reason), unbounded where it
    removes (any depth goes, checked against moves on the way back up).
- Network: `network_mode=none` (no interface but loopback: no egress, no DNS, no bridge gateway).
- Host filesystem: read-only root, data/trainer/candidate mounted read-only, only the per-run out dir
  writable (in the train stage by the harness alone: the candidate writes only tmpfs); out files are read back with O_NOFOLLOW and size caps (symlinks and special files refused).
- Privilege: untrusted code (the candidate, the eval stage's model process) runs as uid 1001 with no
  capability at all and no-new-privileges; the trusted parts are the train harness (root with only the five
  capabilities above) and the scorer (uid 1000, none). A plain RunSpec (not split) runs as uid 1000.
- Resources: memory limit equal to memory+swap (OOM reported as `oom`), CPU quota, finite pids limit
  (fork bombs), file-size ulimit, sized tmpfs and shm (they count against memory), capped json-file logs,
  exactly one GPU by UUID; a wall-clock limit enforced from outside (kill, then wait).
- Leftovers: every container carries instance/owner/experiment/stage/attempt labels and a deterministic
  name; it is removed after the run and the reaper reconciles what a crashed daemon left.

Not covered:
- Faked results, what remains: (1) a model process that escaped torch (a kernel or deserializer bug) can
  remember the rows it was given and answer a probe twin consistently with its earlier answer, so within-row
  peeking would pass the probe; it still never sees a row's last target, other rows' text beyond what it is
  handed, or the result. On a GPU the logits stay in device memory the scorer allocated and shared by a
  descriptor over the socket (no ptrace rights needed between the uids); that path has not run on hardware yet,
  and where it cannot be set up the eval falls back to pinned host memory and says so in result.json.
  Every batch is probed (no sampling), so no detection probability for sampled probing applies.
  The local backend cannot switch uids: there the model process is a separate process of the same uid. (2) The train
  harness stays root (with the five capabilities of a split stage) to keep its kill and its clock: a bug in
  the harness would be a bug with those capabilities; the candidate never runs with them. (3) The compile
  allowance is shared time, not verified compile time: a candidate that compiles less than the baseline may
  train longer, within the same wall-clock every candidate gets. (4) A peek at very few positions can escape the probe with the probability above: at
  the floor a 1% look-ahead survives one eval with probability <= 1%, a 0.1% one with about 63%.
  (5) The val split's files never reach the train container, and for the embedded `stdlib` source the val
  documents come only from a val pool that the trainer image deletes from every Python it holds, whatever its
  base (primary: idlelib, tkinter, turtledemo, the regression tests; fallback for hosts without them:
  pydoc_data, turtle, _pydecimal and the modules Python 3.12/3.13 removed); the build fails if one remains,
  and a red-team test searches the whole train container for every val document of both pools. For a user's own source
  nothing stops them from also being public text a candidate could embed; a replay of memorized text is not
  detectable by the scorer. (6) The daemon's replay memory is the store (`scored_runs`), kept across restarts;
  runs without a store (smoke runs, gpu-smoke) remember only in process, and runs before schema 0005 are unknown.
- Kernel, runc or NVIDIA driver exploits (container escape); use gVisor/Kata or a VM where that matters.
- GPU side channels and GPU memory left by a killed context (we wait for NVML to show it released and
  quarantine the GPU otherwise, but cannot scrub it).
- Timing-based covert channels, CPU cache side channels, and the page cache of the read-only mounts.
- Denial of service of the Docker engine itself through its API (the daemon alone talks to it).
- The daemon itself. Its access to the Docker engine (the `docker` group of the systemd unit, the socket
  mounted read-write into the compose daemon) is root on the engine's host: anything that controls the
  daemon's process (a bug in it, its account, its config or code directory) can start a privileged container
  with `/` mounted. The sandbox protects the host from the candidate, not from the daemon; the unit's
  hardening and its `systemd-analyze security` score do not see this. Narrower: rootless Docker through
  DOCKER_HOST (the engine, and so the socket, is worth the daemon's own user), or a socket proxy that
  limits the API (a URL filter still lets a privileged container be created; only an authorization plugin
  that checks the create request closes that). deploy/README.md, "The Docker socket".

The Slurm backend (a lab cluster) runs the very same container on the compute node's Docker engine,
one Slurm job per stage, so everything above holds on the node; in addition the job's time limit bounds
the run even if the daemon is gone. It trusts the cluster: the shared directory (job scripts, out dirs)
must be writable by the daemon's user only, and whoever administers Slurm or the nodes is trusted.

The local backend is a development fallback: separate session, network and PID namespaces where the
kernel allows (a warning says plainly when it does not), rlimits, kill of the whole namespace at the
limit. It has one uid and no uid-wide kill: a process the candidate detached (setsid) lives until the stage's
namespace dies, after the harness's clean-up; and no kernel quota: the candidate writes the host out dir
directly (files unlinked while open escape the harness's quota). It has no mount namespace (the candidate can read whatever the daemon's user can, including the
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

