"""Red-team constants and helpers: stage limits, the environment, host-state digests, container listing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import docker

from sandbox.spec import Limits

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTANCE = "redteam"
# Tiny budgets: the candidate trains ~2 s; the compile allowance (on the same clock: trainer.clock) and the limits
# leave room for torch's import and the export on a loaded 2-core box.
ENV = {"AUTORESEARCH_TIME_BUDGET": "2", "AUTORESEARCH_COMPILE_BUDGET": "120", "AUTORESEARCH_PRESET": "tiny",
       "AUTORESEARCH_EVAL_TOKENS": "8192"}
TRAIN_LIMITS = Limits(timeout_s=150, memory_bytes=1536 * 1024**2, cpus=1.0, pids=512, shm_bytes=64 * 1024**2,
                      tmpfs_bytes=256 * 1024**2, output_tail_bytes=8192)
EVAL_LIMITS = Limits(timeout_s=150, memory_bytes=1536 * 1024**2, cpus=1.0, pids=512, shm_bytes=64 * 1024**2,
                     tmpfs_bytes=256 * 1024**2, output_tail_bytes=8192)

# For cases that must be killed: a short wall-clock limit keeps the suite fast.
SHORT_LIMITS = Limits(timeout_s=20, memory_bytes=512 * 1024**2, cpus=1.0, pids=256, shm_bytes=64 * 1024**2,
                      tmpfs_bytes=64 * 1024**2, output_tail_bytes=8192)


def tree_digest(root: Path) -> str:
    """A hash of every file's path and bytes under `root`: proves a mount was left untouched."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def our_containers() -> list[object]:
    client = docker.from_env()
    try:
        return list(client.containers.list(all=True, filters={"label": f"autoresearch.instance={INSTANCE}"}))
    finally:
        client.close()
