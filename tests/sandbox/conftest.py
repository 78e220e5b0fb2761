"""Helpers for sandbox tests: a RunSpec that runs a small Python script as the candidate."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox.spec import Limits, Mount, RunSpec

SpecFactory = Callable[..., RunSpec]


@pytest.fixture()
def script_spec(tmp_path: Path) -> SpecFactory:
    """Build a spec running `code` as /candidate/script.py with the out dir as its argv[1]."""

    def make(code: str, *, image: str = "", timeout_s: float = 20.0, memory_bytes: int = 2 * 1024**3,
             pids: int = 4096, gpu_uuid: str | None = None, labels: dict[str, str] | None = None,
             name: str | None = None) -> RunSpec:
        run_dir = tmp_path / uuid.uuid4().hex[:8]
        candidate = run_dir / "candidate"
        candidate.mkdir(parents=True)
        candidate.chmod(0o755)
        (candidate / "script.py").write_text(code)
        (candidate / "script.py").chmod(0o644)
        return RunSpec(
            name=name or f"autoresearch-test-{uuid.uuid4().hex[:12]}",
            command=("python3", "/candidate/script.py", "/out"),
            image=image,
            mounts=(Mount(candidate, "/candidate"), Mount(run_dir / "out", "/out", writable=True)),
            limits=Limits(timeout_s=timeout_s, memory_bytes=memory_bytes, pids=pids, cpus=1.0,
                          shm_bytes=64 * 1024**2, tmpfs_bytes=256 * 1024**2, output_tail_bytes=4096),
            gpu_uuid=gpu_uuid,
            labels=labels or {},
        )

    return make
