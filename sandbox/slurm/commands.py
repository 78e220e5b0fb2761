"""The Slurm client commands the backend uses: sbatch, scontrol, squeue, scancel, sinfo (and nothing else).

Every call has a timeout and a clear error; `SLURM_CONF` points the clients at the configured cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sandbox.errors import BackendUnavailable
from sandbox.slurm.states import JobInfo, job_info_from_line

COMMANDS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")


class SlurmCommandError(BackendUnavailable):
    """A Slurm client failed (refused submission, controller down...); the message has its stderr."""


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    name: str
    state: str
    comment: str


class SlurmClient:
    """Runs Slurm client commands against one cluster (`slurm_conf`, or the clients' own default)."""

    def __init__(self, slurm_conf: Path | None = None, jobcomp_log: Path | None = None,
                 timeout_s: float = 30.0) -> None:
        self.env = dict(os.environ)
        if slurm_conf is not None:
            self.env["SLURM_CONF"] = str(slurm_conf)
        self.jobcomp_log = jobcomp_log
        self.timeout_s = timeout_s

    def missing(self) -> list[str]:
        """The client commands that are not on PATH."""
        return [name for name in COMMANDS if shutil.which(name, path=self.env.get("PATH")) is None]

    def call(self, *argv: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(list(argv), capture_output=True, text=True, timeout=self.timeout_s, check=False,
                                  env=self.env)
        except FileNotFoundError:
            raise SlurmCommandError(f"{argv[0]} is not installed (apt-get install slurm-client, or slurm-wlm)") from None
        except subprocess.TimeoutExpired:
            raise SlurmCommandError(f"`{' '.join(argv[:3])}` did not answer within {self.timeout_s:g} s "
                                    "(is slurmctld up?)") from None

    def checked(self, *argv: str) -> str:
        done = self.call(*argv)
        if done.returncode != 0:
            raise SlurmCommandError(f"`{' '.join(argv)}` failed: {_first_lines(done.stderr or done.stdout)}")
        return done.stdout

    def submit(self, options: list[str], script: Path) -> str:
        """`sbatch --parsable`; the job id."""
        out = self.checked("sbatch", "--parsable", *options, str(script)).strip()
        job_id = out.split(";")[0]
        if not job_id.isdigit():
            raise SlurmCommandError(f"sbatch printed no job id: {out!r}")
        return job_id

    def test_submit(self, options: list[str], script: Path) -> None:
        """`sbatch --test-only`: would the cluster accept this submission (partition, account, QoS, GRES)?"""
        done = self.call("sbatch", "--test-only", *options, str(script))
        # sbatch --test-only reports on stderr; a refusal exits non-zero.
        if done.returncode != 0:
            raise SlurmCommandError(f"the cluster refuses the submission: {_first_lines(done.stderr or done.stdout)}")

    def cancel(self, job_id: str) -> None:
        self.call("scancel", job_id)  # an already finished job is not an error worth reporting

    def job(self, job_id: str) -> JobInfo | None:
        """The job's state from slurmctld, else from the job-completion log; None when neither knows it."""
        done = self.call("scontrol", "show", "job", "-o", job_id)
        if done.returncode == 0:
            info = job_info_from_line(done.stdout.strip().splitlines()[0] if done.stdout.strip() else "", "scontrol")
            if info is not None:
                return info
        elif "Invalid job id" not in (done.stderr + done.stdout):
            raise SlurmCommandError(f"scontrol show job {job_id} failed: {_first_lines(done.stderr)}")
        return self._from_jobcomp(job_id)

    def _from_jobcomp(self, job_id: str) -> JobInfo | None:
        if self.jobcomp_log is None:
            return None
        try:
            text = self.jobcomp_log.read_text(errors="replace")
        except OSError:
            return None
        prefix = f"JobId={job_id} "
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        return job_info_from_line(lines[-1], "jobcomp") if lines else None

    def queue(self) -> list[QueuedJob]:
        """Every job slurmctld lists (all users' view is filtered by the caller through the comment)."""
        out = self.checked("squeue", "-h", "-a", "-o", "%i|%j|%T|%k")
        jobs = []
        for line in out.splitlines():
            parts = line.split("|", 3)
            if len(parts) == 4:
                jobs.append(QueuedJob(*parts))
        return jobs

    def ping(self) -> str:
        """`scontrol ping`; raises unless a controller is UP."""
        out = self.checked("scontrol", "ping")
        if "UP" not in out:
            raise SlurmCommandError(f"no Slurm controller answers: {_first_lines(out)}")
        return out.strip()

    def partition(self, name: str) -> dict[str, str]:
        """`scontrol show partition <name>` as key/value pairs; raises for an unknown partition."""
        from sandbox.slurm.states import parse_pairs

        done = self.call("scontrol", "show", "partition", "-o", name)
        if done.returncode != 0 or not done.stdout.strip():
            raise SlurmCommandError(f"partition {name!r} does not exist on this cluster "
                                    f"({_first_lines(done.stderr or done.stdout)})")
        return parse_pairs(done.stdout)

    def default_partition(self) -> str:
        out = self.checked("sinfo", "-h", "-o", "%P")
        for line in out.split():
            if line.endswith("*"):
                return line.rstrip("*")
        raise SlurmCommandError("the cluster has no default partition: set [slurm] partition")


def _first_lines(text: str, limit: int = 600) -> str:
    return " ".join(text.strip().splitlines())[:limit] or "(no output)"
