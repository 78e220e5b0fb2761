"""The batch script of one stage: the docker backend's hardened container, as a `docker run` on the node.

The hardening is listed once, in `sandbox.docker_backend.container_config`; this module only renders those
keywords as a docker command line (any keyword it does not know is refused, so a flag added there can never
be dropped here silently). The script runs the container detached with capped json-file logs, waits for it
with the stage's exact time limit, records exit code, OOM flag and times in a status file in the job folder,
keeps the last lines of output, and removes the container; SIGTERM (scancel, Slurm's time limit, preemption)
kills the container first.

The GPU is the one Slurm allocated to the job: the script reads it from `$SLURM_JOB_GPUS` at run time.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

from sandbox.docker_backend import LOG_TAIL_LINES, container_config
from sandbox.errors import InvalidSpec
from sandbox.spec import RunSpec

# Stands for the GPU Slurm allocates; replaced by "$SLURM_JOB_GPUS" in the script (never a real UUID).
GPU_PLACEHOLDER = "SLURM-ALLOCATED-GPU"
STATUS_FILE = "status"
OUTPUT_FILE = "output.log"
_GPU_SHELL = '"${SLURM_JOB_GPUS:?Slurm allocated no GPU to this job}"'


def _flag(name: str, value: object) -> list[str]:
    return [f"--{name}", str(value)]


def _mount_arg(mount: Any) -> str:
    source, target = str(mount["Source"]), str(mount["Target"])
    for path in (source, target):
        if any(ch in path for ch in ',"\n'):
            raise InvalidSpec(f"mount path {path!r} cannot be passed to `docker run --mount` (comma, quote or newline)")
    arg = f"type={mount['Type']},source={source},target={target}"
    return arg + (",readonly" if mount.get("ReadOnly") else "")


def _render(key: str, value: Any) -> list[str]:
    if key in ("image", "command", "detach"):
        return []  # placed by the caller
    if key == "name":
        return _flag("name", value)
    if key == "environment":
        return [arg for k, v in sorted(value.items()) for arg in ("--env", f"{k}={v}")]
    if key == "working_dir":
        return _flag("workdir", value)
    if key == "user":
        return _flag("user", value)
    if key == "labels":
        return [arg for k, v in sorted(value.items()) for arg in ("--label", f"{k}={v}")]
    if key == "mounts":
        return [arg for m in value for arg in ("--mount", _mount_arg(m))]
    if key == "network_mode":
        return _flag("network", value)
    if key == "read_only":
        return ["--read-only"] if value else []
    if key == "tmpfs":
        return [arg for path, opts in sorted(value.items()) for arg in ("--tmpfs", f"{path}:{opts}")]
    if key == "cap_drop":
        return [arg for cap in value for arg in ("--cap-drop", cap)]
    if key == "cap_add":
        return [arg for cap in value for arg in ("--cap-add", cap)]
    if key == "security_opt":
        return [arg for opt in value for arg in ("--security-opt", opt)]
    if key == "pids_limit":
        return _flag("pids-limit", value)
    if key == "mem_limit":
        return _flag("memory", f"{int(value)}b")
    if key == "memswap_limit":
        return _flag("memory-swap", f"{int(value)}b")
    if key == "nano_cpus":
        return _flag("cpus", f"{value / 1e9:g}")
    if key == "shm_size":
        return _flag("shm-size", f"{int(value)}b")
    if key == "ulimits":
        return [arg for u in value for arg in ("--ulimit", f"{u.name}={u.soft}:{u.hard}")]
    if key == "log_config":
        return ["--log-driver", value.type, *(a for k, v in sorted(value.config.items()) for a in ("--log-opt", f"{k}={v}"))]
    if key == "storage_opt":
        return [arg for k, v in sorted(value.items()) for arg in ("--storage-opt", f"{k}={v}")]
    if key == "stop_timeout":
        return _flag("stop-timeout", int(value))
    if key == "init":
        return ["--init"] if value else []
    if key == "device_requests":
        ids = [i for request in value for i in (request.device_ids or [])]
        if len(ids) > 1 or (value and not ids):
            raise InvalidSpec(f"a stage gets exactly one GPU, by id; got device requests {value!r}")
        return ["--gpus", f"device={ids[0]}"] if ids else []
    raise InvalidSpec(f"container keyword {key!r} has no `docker run` form in the Slurm backend: add it to "
                      "sandbox/slurm/script.py so the node runs the same hardening")


def docker_run_argv(spec: RunSpec, instance: str, gpu: bool) -> list[str]:
    """`docker run -d ...` for `spec`, with the GPU placeholder standing for Slurm's allocation when `gpu`."""
    config = container_config(replace(spec, gpu_uuid=GPU_PLACEHOLDER if gpu else None), instance)
    argv = ["docker", "run", "--detach"]
    for key, value in config.items():
        argv += _render(key, value)
    return [*argv, str(config["image"]), *(str(part) for part in config["command"])]


def _shell(argv: list[str]) -> str:
    """Quote argv for bash; the GPU placeholder becomes the job's `$SLURM_JOB_GPUS` (double-quoted)."""
    words = []
    for arg in argv:
        if GPU_PLACEHOLDER in arg:
            if arg == f"device={GPU_PLACEHOLDER}":
                words.append(f"device={_GPU_SHELL}")
            elif arg == f"NVIDIA_VISIBLE_DEVICES={GPU_PLACEHOLDER}":
                words.append(f"NVIDIA_VISIBLE_DEVICES={_GPU_SHELL}")
            else:
                raise InvalidSpec(f"unexpected GPU placeholder in argument {arg!r}")
        else:
            words.append(shlex.quote(arg))
    return " \\\n    ".join(words)


def batch_script(spec: RunSpec, instance: str, job_dir: Path, gpu: bool) -> str:
    """The bash script `sbatch` runs on the node for `spec` (see the module docstring)."""
    timeout_s = max(1, math.ceil(spec.limits.timeout_s))
    name = shlex.quote(spec.name)
    folder = shlex.quote(str(job_dir))
    return f"""#!/bin/bash
# autoresearch stage {spec.name}: generated by the Slurm backend; runs the hardened trainer container.
set -u
JOB_DIR={folder}
NAME={name}
note() {{ printf '%s\\n' "$1" >> "$JOB_DIR/{STATUS_FILE}.part"; }}
finish() {{ note "ended=$(date +%s.%N)"; note "phase=$1"; mv "$JOB_DIR/{STATUS_FILE}.part" "$JOB_DIR/{STATUS_FILE}"; }}
collect() {{
  note "state=$(docker inspect -f '{{{{.State.ExitCode}}}} {{{{.State.OOMKilled}}}}' "$NAME" 2>/dev/null)"
  docker logs --tail {LOG_TAIL_LINES} "$NAME" > "$JOB_DIR/{OUTPUT_FILE}" 2>&1
  docker rm -f "$NAME" > /dev/null 2>&1
}}
on_signal() {{ docker kill "$NAME" > /dev/null 2>&1; docker wait "$NAME" > /dev/null 2>&1; collect; finish killed; exit 143; }}
trap on_signal TERM INT
: > "$JOB_DIR/{STATUS_FILE}.part"
note "node=$(hostname)"
docker rm -f "$NAME" > /dev/null 2>&1
note "started=$(date +%s.%N)"
if ! {_shell(docker_run_argv(spec, instance, gpu))} > /dev/null 2> "$JOB_DIR/docker.err"; then
  note "error=$(head -c 2000 "$JOB_DIR/docker.err" | tr '\\n' ' ')"
  docker rm -f "$NAME" > /dev/null 2>&1
  finish start-failed
  exit 1
fi
timeout {timeout_s} docker wait "$NAME" > /dev/null 2>&1 &
wait $!
if [ $? -eq 124 ]; then
  note "timed_out=1"
  docker kill "$NAME" > /dev/null 2>&1
  docker wait "$NAME" > /dev/null 2>&1
fi
if [ "$(docker inspect -f '{{{{.State.Running}}}}' "$NAME" 2>/dev/null)" = "true" ]; then
  note "lost_wait=1"
  docker kill "$NAME" > /dev/null 2>&1
fi
collect
finish done
"""
