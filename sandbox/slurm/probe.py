"""`doctor`'s look at a compute node: one tiny job that checks the node's Docker engine and the trainer image."""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass

from sandbox import treewalk
from sandbox.slurm.backend import SLURM_OUT, SlurmBackend
from sandbox.slurm.commands import SlurmCommandError

# Exit codes of the probe script, each with what to do about it.
_FAILURES = {
    3: "install Docker on the compute nodes (or see deploy/slurm/README.md: Apptainer is the next step)",
    4: "start dockerd on the nodes and let the daemon's user reach it",
    5: "load the trainer image on every node (`docker save` here, `docker load` there)",
    6: "install the NVIDIA container toolkit on the GPU nodes",
}


@dataclass(frozen=True)
class NodeProbe:
    verdict: str  # ok | fail | pending
    detail: str
    fix: str = ""


def _script(image: str, gpu: bool) -> str:
    quoted = shlex.quote(image)
    lines = [
        "#!/bin/bash",
        'command -v docker > /dev/null || { echo "no docker CLI on $(hostname)"; exit 3; }',
        'docker info > /dev/null 2>&1 || { echo "the docker engine does not answer on $(hostname)"; exit 4; }',
        f'docker image inspect {quoted} > /dev/null 2>&1 || {{ echo "image {image} missing on $(hostname)"; exit 5; }}',
    ]
    if gpu:
        lines.append('docker info 2>/dev/null | grep -qi nvidia || { echo "no nvidia runtime on $(hostname)"; exit 6; }')
    lines.append(f'echo "Docker $(docker version -f \'{{{{.Server.Version}}}}\') with {image} on $(hostname)"')
    return "\n".join(lines) + "\n"


def probe_node(backend: SlurmBackend, image: str, wait_s: float = 60.0) -> NodeProbe:
    """Submit the probe to the configured partition and wait up to `wait_s` for its verdict."""
    folder = backend.jobs_dir / f".doctor-{backend.instance}"
    treewalk.remove_tree(folder)
    folder.mkdir(parents=True)
    try:
        script = folder / "probe.sh"
        script.write_text(_script(image, bool(backend.options.gres)))
        script.chmod(0o700)
        o = backend.options
        options = ["--job-name=autoresearch-doctor", "--time=2", "--nodes=1", "--ntasks=1", "--no-requeue",
                   f"--output={folder / SLURM_OUT}", f"--chdir={folder}"]
        options += [f"--partition={o.partition}"] if o.partition else []
        options += [f"--qos={o.qos}"] if o.qos else []
        options += [f"--account={o.account}"] if o.account else []
        options += [f"--gres={o.gres}"] if o.gres else []
        try:
            job_id = backend.client.submit([*options, *o.extra_args], script)
        except SlurmCommandError as exc:
            return NodeProbe("fail", str(exc)[:200], "fix the [slurm] partition/account/qos settings")
        deadline = time.monotonic() + wait_s
        info = None
        while time.monotonic() < deadline:
            info = backend.client.job(job_id)
            if info is not None and info.final:
                break
            time.sleep(min(1.0, o.poll_s))
        else:
            backend.client.cancel(job_id)
            return NodeProbe("pending", f"probe job {job_id} did not run within {wait_s:g} s (busy cluster?)",
                             "run `autoresearch doctor` again when the partition has room")
        output = (folder / SLURM_OUT).read_text(errors="replace").strip() if (folder / SLURM_OUT).exists() else ""
        code = int(info.exit_code.split(":")[0]) if info is not None and info.exit_code[:1].isdigit() else -1
        if info is not None and info.state == "COMPLETED" and code == 0:
            return NodeProbe("ok", output.splitlines()[-1] if output else "probe job completed")
        return NodeProbe("fail", output[-200:] or f"probe job ended {info.state if info else '?'} (exit {code})",
                         _FAILURES.get(code, "see the probe job's output"))
    finally:
        treewalk.remove_tree(folder)
