"""A throwaway single-node Slurm cluster owned by the test suite (Debian's slurm-wlm and munge).

Everything is private to one temp dir: a munge key, socket, pid, log and seed file for its own `munged`;
a generated slurm.conf with free ports (SlurmctldPort, SlurmdPort), its own state, spool and log dirs and a
job-completion log (jobcomp/filetxt, since there is no slurmdbd) and a job_submit.lua that
admits only the accounts `lab` and `ops` (without slurmdbd Slurm itself knows no accounts). The node is `localhost` with 2 CPUs and
three partitions: `normal` (the default), `harvest` (preemptible: a lower
PriorityTier, PreemptMode=REQUEUE) and `owners` (the higher tier whose jobs preempt harvest jobs).

slurmctld and slurmd need root (slurmd starts jobs as their user). Only the PIDs this module started are
ever signalled; a watcher process stops them too if pytest dies without running its teardown.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
PARTITION = "normal"
HARVEST_PARTITION = "harvest"
OWNERS_PARTITION = "owners"
ACCOUNTS = ("lab", "ops")

# Runs detached: waits for the pytest process to exit, then SIGKILLs the PIDs it was given (ours only).
_WATCHER = """
import os, shutil, signal, sys, time
parent, root, pids = int(sys.argv[1]), sys.argv[2], [int(p) for p in sys.argv[3:]]
while os.path.isdir(root):
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        break
    except PermissionError:
        pass
    time.sleep(1)
else:
    sys.exit(0)
for pid in pids:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
shutil.rmtree(root, ignore_errors=True)
"""


class SlurmClusterError(RuntimeError):
    """The suite's Slurm cluster could not be started (the message says why)."""


def missing_reason() -> str | None:
    """Why this machine cannot run the suite's Slurm cluster, or None when it can."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return f"missing {', '.join(missing)}: apt-get install --no-install-recommends slurm-wlm munge"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs: run the Slurm tests as root"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _binary(name: str) -> str:
    found = shutil.which(name)
    return found if found else str(Path("/usr/sbin") / name)


class SlurmCluster:
    """One munged + slurmctld + slurmd in a temp dir; `start`, `stop`; `env` for the client commands."""

    def __init__(self, name: str = "autoresearch-test-slurm") -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        self.root.chmod(0o755)
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.jobcomp = self.root / "log" / "jobcomp.txt"
        self.shared = self.root / "shared"  # the "shared directory" of the cluster (same path on every node)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._watcher: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment the Slurm clients need to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _write_munge(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)

    def _write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(mode=0o755)
        self.shared.mkdir(mode=0o755)
        memory_mb = 16384
        self.conf.write_text("\n".join([
            "ClusterName=artest",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}",
            "MinJobAge=600",
            "KillWait=10",
            "InactiveLimit=0",
            "EnforcePartLimits=ALL",
            "JobSubmitPlugins=lua",
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory={memory_mb} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP "
            "PriorityTier=10",
            f"PartitionName={HARVEST_PARTITION} Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=1 "
            "PreemptMode=REQUEUE",
            f"PartitionName={OWNERS_PARTITION} Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=100",
            "",
        ]))

    def _write_job_submit(self) -> None:
        """A site policy without slurmdbd: only the accounts in ACCOUNTS may submit (as job_submit.lua does)."""
        allowed = ", ".join(f'["{a}"] = true' for a in ACCOUNTS)
        (self.root / "job_submit.lua").write_text(f"""
local allowed = {{ {allowed} }}
function slurm_job_submit(job_desc, part_list, submit_uid)
  if job_desc.account ~= nil and not allowed[job_desc.account] then
    slurm.log_user("Invalid account %s: this cluster allows {', '.join(ACCOUNTS)}", job_desc.account)
    return slurm.ERROR
  end
  return slurm.SUCCESS
end
function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
  return slurm.SUCCESS
end
""")

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(self.root / "log" / log_name, "ab")  # noqa: SIM115 - the child keeps it
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **self.env}, cwd=self.root, start_new_session=True)
        finally:
            log.close()
        self._procs.append(proc)
        return proc

    def start(self) -> SlurmCluster:
        """Start munged, slurmctld and slurmd; waits until the node is idle and takes jobs."""
        if (reason := missing_reason()) is not None:
            raise SlurmClusterError(reason)
        self._write_munge()
        self._write_conf()
        self._write_job_submit()
        munge = self.root / "munge"
        self._spawn([_binary("munged"), "-F", "--force", f"--key-file={munge / 'munge.key'}",
                     f"--socket={self.munge_socket}", f"--pid-file={munge / 'munged.pid'}",
                     f"--log-file={self.root / 'log' / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"],
                    "munged.out")
        self._wait(lambda: self.munge_socket.exists(), "munged socket", 15)
        self._spawn([_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._wait(self._ctld_answers, "slurmctld", 30)
        self._spawn([_binary("slurmd"), "-D", "-f", str(self.conf), "-N", "localhost"], "slurmd.out")
        self._start_watcher()
        self._wait(self._node_idle, "node localhost to become idle", 60)
        return self

    def _client(self, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, **self.env})

    def _ctld_answers(self) -> bool:
        return self._client("scontrol", "ping").stdout.count("UP") > 0

    def _node_idle(self) -> bool:
        state = self._client("sinfo", "-h", "-n", "localhost", "-o", "%T").stdout.strip().lower()
        return state.startswith("idle")

    def _wait(self, ready: object, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    name = Path(str(proc.args[0] if isinstance(proc.args, list) else proc.args)).name
                    raise SlurmClusterError(f"{name} exited ({proc.returncode}) "
                                            f"while waiting for {what}:\n{self.logs()}")
            if callable(ready) and ready():
                return
            time.sleep(0.3)
        raise SlurmClusterError(f"timed out waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        """The tail of every daemon log (for failure messages)."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            if path.is_file() and path != self.jobcomp:
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-1500:]}")
        return "\n".join(parts)

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster."""
        return self._client(*argv)

    def stop(self) -> None:
        """Stop the daemons this cluster started (SIGTERM, then SIGKILL) and remove the temp dir; idempotent."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)
        if self._watcher is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watcher.wait(timeout=5)
            self._watcher = None

    def _start_watcher(self) -> None:
        pids = [str(proc.pid) for proc in self._procs]
        self._watcher = subprocess.Popen([sys.executable, "-c", _WATCHER, str(os.getpid()), str(self.root), *pids],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True, cwd="/")
