"""Development fallback: run a stage as a local subprocess, with as much isolation as the host allows.

Each run starts as `prlimit ... -- unshare --net --pid --fork --kill-child -- CMD` in its own session:
no network (a fresh, empty network namespace), its own PID namespace (killing it kills every process
it started, even ones that called setsid), and rlimits on address space, processes, file size and
open files. Where the kernel refuses namespaces the run still happens, with a plain warning that the
candidate has network access. There is no mount namespace: paths are rewritten (see contracts.md).
It is a development backend: with one uid and no mount namespace it has neither the Docker backend's uid-wide kill
at the end of a train stage nor its kernel-enforced disk quota (DEVELOPMENT_WARNING, printed when it is opened).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO

from sandbox import treewalk
from sandbox.base import ReapedRun
from sandbox.errors import BackendUnavailable
from sandbox.outfiles import prepare_out_dir, read_out_files
from sandbox.spec import Cancel, Mount, RunResult, RunSpec, RunStatus, exit_status
from sandbox.tail import sanitize_tail

POLL_SECONDS = 0.5
KILL_WAIT_SECONDS = 30.0
REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINER_TARGET = "/opt/autoresearch/trainer"
OOM_SEARCH_LINES = 5
OOM_ALLOCATOR_MESSAGE = "can't allocate memory"  # torch's CPU allocator under RLIMIT_AS
_NAMESPACE_FLAGS = ("--net", "--pid", "--fork", "--kill-child")
DEVELOPMENT_WARNING = (
    "sandbox: the local backend is a development backend: one uid and no mount namespace, so a process the "
    "candidate detaches outlives its exit until the stage ends, its out dir is host disk with no kernel quota "
    "(files unlinked while open escape the quota), and it can read what your user can. Use docker or slurm for "
    "real runs.")


def _probe_unshare() -> tuple[str, ...] | None:
    """The unshare prefix this host accepts (plain as root, user-mapped otherwise), or None."""
    if shutil.which("unshare") is None:
        return None
    for extra in ((), ("--map-root-user",)):
        prefix = ("unshare", *_NAMESPACE_FLAGS, *extra, "--")
        probe = subprocess.run([*prefix, "true"], capture_output=True, check=False)
        if probe.returncode == 0:
            return prefix
    return None


def _descendants(root_pids: set[int]) -> set[int]:
    """`root_pids` and every process below them, from the parent links in /proc (PID-namespace children included)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                # The command name may hold spaces and parentheses: the fields after the last ')' are fixed.
                fields = stat.read().rpartition(b")")[2].split()
        except OSError:  # the process exited while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    pending = list(root_pids)
    while pending:
        pid = pending.pop()
        if pid not in found:
            found.add(pid)
            pending.extend(children.get(pid, ()))
    return found


def rewrite_path(value: str, mounts: tuple[Mount, ...]) -> str:
    """Map a container path (or an env value starting with one) to its host source path."""
    for mount in sorted(mounts, key=lambda m: len(m.target), reverse=True):
        if value == mount.target or value.startswith(mount.target.rstrip("/") + "/"):
            return str(mount.source) + value[len(mount.target.rstrip("/")):]
    return value


class _TailReader(threading.Thread):
    """Drains the child's output pipe, keeping only the last `cap` bytes (the child never blocks on it)."""

    def __init__(self, stream: IO[bytes], cap: int) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.cap = max(cap, 1)
        self.data = b""

    def run(self) -> None:
        while chunk := self.stream.read(65536):
            self.data = (self.data + chunk)[-self.cap:]


class LocalBackend:
    """Runs `RunSpec`s as local subprocesses; `network_isolated` says whether egress is really cut."""

    name = "local"

    def __init__(self, instance: str, project_root: Path = REPO_ROOT) -> None:
        if shutil.which("prlimit") is None:
            raise BackendUnavailable("the local backend needs `prlimit` (util-linux): apt-get install util-linux")
        self.instance = instance
        self.project_root = project_root
        self.unshare_prefix = _probe_unshare()
        self.network_isolated = self.unshare_prefix is not None
        self._running: set[subprocess.Popen[bytes]] = set()
        self._running_lock = threading.Lock()
        print(DEVELOPMENT_WARNING, file=sys.stderr, flush=True)
        if not self.network_isolated:
            warnings.warn(
                "local sandbox: this kernel refuses network/PID namespaces (unshare); candidates run WITH "
                "network access and may leave processes behind. Use the Docker backend for real isolation.",
                RuntimeWarning, stacklevel=2,
            )

    def _argv(self, spec: RunSpec) -> list[str]:
        limits = spec.limits
        rlimits = [f"--nproc={limits.pids}", f"--fsize={limits.out_file_max_bytes}", "--nofile=4096", "--core=0"]
        if spec.gpu_uuid is None:
            # The CUDA driver reserves huge virtual ranges, so the address-space cap is CPU-only.
            rlimits.append(f"--as={limits.memory_bytes}")
        command = [rewrite_path(arg, spec.mounts) for arg in spec.command]
        if command and command[0] in ("python3", "python"):
            command[0] = sys.executable  # the interpreter that has torch, like the image's python3
        return ["prlimit", *rlimits, "--", *(self.unshare_prefix or ()), *command]

    def _env(self, spec: RunSpec, tmp_dir: str) -> dict[str, str]:
        trainer = next((m for m in spec.mounts if m.target == TRAINER_TARGET), None)
        env = {key: rewrite_path(value, spec.mounts) for key, value in spec.env.items()}
        env.update({
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": tmp_dir,
            "TMPDIR": tmp_dir,
            "PYTHONPATH": str(trainer.source.parent if trainer is not None else self.project_root),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            # Empty hides every GPU; a UUID pins exactly that one.
            "CUDA_VISIBLE_DEVICES": spec.gpu_uuid or "",
        })
        return env

    def run(self, spec: RunSpec, cancel: Cancel | None = None) -> RunResult:
        out_dir = spec.out_mount().source
        prepare_out_dir(out_dir)
        spec.check_mounts()
        started = time.monotonic()
        # The run's TMPDIR is the candidate's to fill: removed by sandbox.treewalk (TemporaryDirectory's
        # shutil.rmtree recurses and raises on a deep folder chain).
        tmp_dir = tempfile.mkdtemp(prefix=f"{spec.name}-tmp-")
        try:
            try:
                proc = subprocess.Popen(
                    self._argv(spec), cwd=rewrite_path(spec.workdir, spec.mounts), env=self._env(spec, tmp_dir),
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                return RunResult(RunStatus.INFRA_ERROR, None, time.monotonic() - started,
                                 error=f"could not start {spec.command[:1]}: {exc}")
            assert proc.stdout is not None
            reader = _TailReader(proc.stdout, spec.limits.output_tail_bytes)
            reader.start()
            with self._running_lock:
                self._running.add(proc)
            try:
                killed_as = self._wait(proc, spec.limits.timeout_s, started, cancel)
            finally:
                with self._running_lock:
                    self._running.discard(proc)
            reader.join(KILL_WAIT_SECONDS)
            wall = time.monotonic() - started
        finally:
            treewalk.remove_tree(tmp_dir)
        return self._result(proc.returncode, killed_as, reader.data, spec, wall)

    def _wait(self, proc: subprocess.Popen[bytes], timeout_s: float, started: float,
              cancel: Cancel | None) -> RunStatus | None:
        deadline = started + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            reason = RunStatus.TIMEOUT if remaining <= 0 else (cancel.reason if cancel is not None else None)
            if reason is not None:
                self._kill_group(proc)
                return reason
            try:
                proc.wait(timeout=max(0.05, min(POLL_SECONDS, remaining)))
                return None
            except subprocess.TimeoutExpired:
                continue

    def _kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        # The session's process group holds prlimit/unshare; --kill-child then takes the whole PID namespace.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        # Unkillable (D state): the returncode stays None and the run still reports its kill status.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=KILL_WAIT_SECONDS)

    def _result(self, returncode: int | None, killed_as: RunStatus | None, output: bytes, spec: RunSpec,
                wall: float) -> RunResult:
        tail = sanitize_tail(output, spec.limits.output_tail_bytes)
        # No cgroup here: an OOM shows as the kernel's SIGKILL or, under RLIMIT_AS, as Python's MemoryError
        # or torch's allocator error; the harness prints a line of its own after the candidate's traceback.
        last_lines = tail.rstrip().splitlines()[-OOM_SEARCH_LINES:]
        oom = killed_as is None and returncode != 0 and (
            returncode == -signal.SIGKILL
            or any(line.startswith("MemoryError") or OOM_ALLOCATOR_MESSAGE in line for line in last_lines))
        status = exit_status(killed_as, oom, returncode)
        out = read_out_files(spec.out_mount().source)
        return RunResult(status=status, exit_code=returncode, wall_seconds=wall, output_tail=tail,
                         files=out.files, oom_killed=oom, error=out.describe_refused())

    def active_pids(self) -> set[int]:
        """Host PIDs of the running stages: each subprocess and everything it started."""
        with self._running_lock:
            roots = {proc.pid for proc in self._running if proc.poll() is None}
        return _descendants(roots) if roots else set()

    def reap(self, owner_alive: Callable[[str], bool]) -> list[ReapedRun]:
        """Nothing to reconcile: local runs are not registered anywhere outside the daemon process."""
        return []
