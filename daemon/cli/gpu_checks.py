"""`doctor --gpu` first-run checks of the hardened CUDA container, through Docker (the production path).

Before the tiny baseline run (daemon.cli.gpu_smoke: the baseline's export moves to CUDA and scores), each of
these must hold, and each failure says how to fix it:
1. the NVIDIA runtime is registered with dockerd (`docker info`: Runtimes);
2. libcuda is visible to Triton inside the read-only container;
3. a Triton kernel compiles and runs as the candidate's uid, into the private compile cache;
4. Inductor's compile workers are bounded by the container's CPU quota (TORCHINDUCTOR_COMPILE_THREADS).
Checks 2-4 run as a train-stage "candidate" (PROBE_SOURCE) through the real StageRunner on the lane's GPU: the
same image, read-only root, uids, private cache and limits as a night. Its report is one line per check.

UNVERIFIED: no lab server with Docker and a GPU has run these yet (the lent GPU machines have no Docker). The
parsing and verdicts are tested on CPU with fake `docker info` output and fake probe reports; the probe script
itself is tested on this CPU machine, where it must fail each GPU check with its reason.
"""

from __future__ import annotations

import json
from typing import Any

from daemon.cli.check import FAIL, OK, WARN, Check

REPORT_PREFIX = "GPUCHECK "
RUNTIME_FIX = ("install nvidia-container-toolkit, then `sudo nvidia-ctk runtime configure --runtime=docker && "
               "sudo systemctl restart docker`")

# Runs as the candidate (the model uid) in a train stage: prints one GPUCHECK line per check, then exits 0.
PROBE_SOURCE = r'''
import json, math, os, pathlib, sys

def report(name, ok, detail):
    print("GPUCHECK " + json.dumps({"check": name, "ok": bool(ok), "detail": str(detail)[:300]}), flush=True)

try:
    from triton.backends.nvidia.driver import libcuda_dirs
    dirs = libcuda_dirs()
    report("libcuda", bool(dirs), f"Triton finds libcuda.so in {dirs}")
except Exception as exc:
    report("libcuda", False, f"{type(exc).__name__}: {exc}")

try:
    import torch, triton, triton.language as tl

    @triton.jit
    def add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + tl.load(y_ptr + offsets, mask=mask), mask=mask)

    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False in the container")
    x = torch.arange(1000, device="cuda", dtype=torch.float32)
    out = torch.empty_like(x)
    add[(4,)](x, x, out, 1000, BLOCK=256)
    cache = os.environ.get("TRITON_CACHE_DIR", "")
    cached = sum(1 for _ in pathlib.Path(cache).rglob("*") if _.is_file()) if cache else 0
    ok = bool(torch.equal(out, 2 * x)) and cached > 0
    report("triton", ok, f"kernel ran as uid {os.getuid()}, {cached} files in the private cache {cache or '(unset)'}")
except Exception as exc:
    report("triton", False, f"uid {os.getuid()}: {type(exc).__name__}: {exc}")

quota = None
try:
    raw = pathlib.Path("/sys/fs/cgroup/cpu.max").read_text().split()
    quota = None if raw[0] == "max" else int(raw[0]) / int(raw[1])
except Exception:
    try:
        base = pathlib.Path("/sys/fs/cgroup/cpu")
        q, p = int((base / "cpu.cfs_quota_us").read_text()), int((base / "cpu.cfs_period_us").read_text())
        quota = None if q <= 0 else q / p
    except Exception:
        pass
threads = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "")
report("compile_threads", bool(threads) and (quota is None or int(threads) <= max(1, math.floor(quota))),
       f"TORCHINDUCTOR_COMPILE_THREADS={threads or '(unset)'}, CPU quota {quota if quota is not None else 'none'}")
'''

CONTAINER_CHECKS = {
    "libcuda": ("libcuda for Triton", "the image must run under the NVIDIA runtime (check 1); Triton looks up "
                "libcuda with `ldconfig -p`, so the runtime's mounts must be in the linker cache (or set "
                "TRITON_LIBCUDA_PATH in the image)"),
    "triton": ("Triton kernel as candidate", "the candidate uid must be able to write its private compile cache "
               "(trainer.compile_cache) and /tmp must allow exec; see `docker logs` of the stage"),
    "compile_threads": ("compile workers", "the harness sets TORCHINDUCTOR_COMPILE_THREADS from the CPU quota "
                        "(trainer.device_check): update the trainer mounted in the container"),
}


def runtime_check(info: dict[str, Any]) -> Check:
    """Check 1 from `docker info` (the engine's JSON): the nvidia runtime registered with dockerd."""
    runtimes = info.get("Runtimes") or {}
    default = info.get("DefaultRuntime", "runc")
    if "nvidia" in runtimes:
        return Check("nvidia runtime", OK, f"registered with dockerd (default runtime: {default})")
    cdi = [spec for spec in info.get("CDISpecDirs") or [] if spec]
    if cdi:
        return Check("nvidia runtime", WARN, f"not registered; CDI spec dirs {cdi} (GPU requests may still work)",
                     RUNTIME_FIX)
    return Check("nvidia runtime", FAIL, f"dockerd knows runtimes {sorted(runtimes) or ['runc']}, not nvidia",
                 RUNTIME_FIX)


def parse_report(output: str) -> dict[str, dict[str, Any]]:
    """The probe's GPUCHECK lines by check name (lines that do not parse are skipped)."""
    found: dict[str, dict[str, Any]] = {}
    for line in output.splitlines():
        start = line.find(REPORT_PREFIX)
        if start < 0:
            continue
        try:
            entry = json.loads(line[start + len(REPORT_PREFIX):])
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("check") in CONTAINER_CHECKS:
            found[str(entry["check"])] = entry
    return found


def container_checks(output: str, failure: str = "") -> list[Check]:
    """Checks 2-4 from the probe's output; a check without a line FAILs with the stage's failure."""
    report = parse_report(output)
    checks = []
    for key, (name, fix) in CONTAINER_CHECKS.items():
        entry = report.get(key)
        if entry is None:
            checks.append(Check(name, FAIL, f"no report from the container ({failure or 'the probe did not run'})",
                                fix))
        else:
            checks.append(Check(name, OK if entry.get("ok") is True else FAIL, str(entry.get("detail", "")),
                                "" if entry.get("ok") is True else fix))
    return checks


def docker_info() -> dict[str, Any]:
    """`docker info` from the engine (raises when the engine does not answer)."""
    import docker

    client = docker.from_env(timeout=10)
    try:
        return dict(client.info())
    finally:
        client.close()
