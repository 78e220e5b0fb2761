"""`autoresearch doctor` for the Slurm backend: commands, controller, partition, shared directory, node runtime."""

from __future__ import annotations

import os
import uuid

from daemon.cli.check import FAIL, OK, WARN, Check
from daemon.config import Settings
from sandbox.errors import BackendUnavailable

NODE_PROBE_WAIT_S = 60.0


def check_slurm(settings: Settings, node_wait_s: float = NODE_PROBE_WAIT_S) -> list[Check]:
    """Nothing unless `[sandbox] backend = "slurm"`; then one line per part the cluster backend needs."""
    if settings.sandbox.backend != "slurm":
        return []
    from daemon.service.cluster import slurm_options
    from daemon.service.runtime import TRAINER_DIR
    from sandbox.slurm import SlurmBackend
    from sandbox.slurm.probe import probe_node

    backend = SlurmBackend(settings.instance_name, slurm_options(settings))
    missing = backend.client.missing()
    if missing:
        return [Check("slurm commands", FAIL, f"missing: {', '.join(missing)}",
                      "apt-get install --no-install-recommends slurm-client (the login node needs the clients only)")]
    checks = [Check("slurm commands", OK, "sbatch, squeue, scontrol, scancel, sinfo")]
    shared = _check_shared(settings)
    checks.append(shared)
    try:
        checks.append(Check("slurm partition", OK, backend.check(settings.sandbox.image)))
    except BackendUnavailable as exc:
        checks.append(Check("slurm partition", FAIL, str(exc)[:200],
                            "fix [slurm] partition/account/qos/gres (see `sinfo` and `scontrol show partition`)"))
        return checks
    try:
        backend.require_shared([settings.workspace, settings.data_dir, TRAINER_DIR])
        checks.append(Check("slurm node paths", OK, "workspace, data and trainer are on paths the nodes see"))
    except BackendUnavailable as exc:
        checks.append(Check("slurm node paths", FAIL, str(exc)[:200], "see deploy/slurm/README.md"))
    if shared.verdict == FAIL:
        return checks
    probe = probe_node(backend, settings.sandbox.image, node_wait_s)
    verdict = {"ok": OK, "fail": FAIL}.get(probe.verdict, WARN)
    checks.append(Check("slurm node runtime", verdict, probe.detail, probe.fix))
    return checks


def _check_shared(settings: Settings) -> Check:
    shared = settings.slurm.shared_dir
    if shared is None or not shared.is_dir():
        return Check("slurm shared dir", FAIL, f"{shared} does not exist",
                     "mount the cluster's shared filesystem and set slurm.shared_dir to a folder on it")
    probe = shared / f".autoresearch-doctor-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        return Check("slurm shared dir", FAIL, f"{shared}: not writable ({exc.strerror})",
                     "give the daemon's user write access to slurm.shared_dir")
    mode = shared.stat().st_mode
    if mode & 0o002:
        return Check("slurm shared dir", WARN, f"{shared} is world-writable (job scripts live there)",
                     f"chmod o-w {shared}")
    return Check("slurm shared dir", OK, f"{shared} (writable{', owned by us' if shared.stat().st_uid == os.geteuid() else ''})")
