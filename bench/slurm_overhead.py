"""Median wall seconds of one sandboxed stage: Docker backend vs Slurm backend (one job per stage), side by side.

    .venv/bin/python bench/slurm_overhead.py [--repeats 5] [--poll 0.5 2.0]

Starts the test suite's throwaway single-node Slurm cluster (root, slurm-wlm and munge installed), so both
backends run the same hardened container on this machine's Docker engine; the difference is Slurm's own
cost per stage: sbatch, scheduling, the batch script's docker CLI calls and the backend's polling. Also
prints the median latency of one `sbatch --parsable` call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from sandbox.docker_backend import DockerBackend  # noqa: E402
from sandbox.images import ensure_offline_image  # noqa: E402
from sandbox.slurm import SlurmBackend, SlurmOptions  # noqa: E402
from sandbox.spec import Limits, Mount, RunSpec, RunStatus  # noqa: E402
from tests.slurmcluster import PARTITION, SlurmCluster  # noqa: E402


def _median_stage(backend: object, image: str, root: Path, label: str, repeats: int) -> float:
    walls = []
    for i in range(repeats):
        out = root / f"{label}-{i}"
        spec = RunSpec(name=f"autoresearch-bench-{label}-{i}", command=("python3", "-c", "pass"), image=image,
                       mounts=(Mount(out, "/out", True),), limits=Limits(timeout_s=120, memory_bytes=2 * 1024**3,
                                                                           cpus=1))
        started = time.monotonic()
        result = backend.run(spec)  # type: ignore[attr-defined]
        walls.append(time.monotonic() - started)
        if result.status is not RunStatus.OK:
            raise SystemExit(f"{label}: run {i} ended {result.status.value}: {result.error} {result.output_tail}")
    return statistics.median(walls)


def _sbatch_latency(cluster: SlurmCluster, root: Path, repeats: int) -> float:
    script = root / "noop.sh"
    script.write_text("#!/bin/sh\ntrue\n")
    walls = []
    for _ in range(repeats):
        started = time.monotonic()
        done = cluster.run("sbatch", "--parsable", f"--output={root / 'noop.out'}", "--account=lab", str(script))
        walls.append(time.monotonic() - started)
        if done.returncode != 0:
            raise SystemExit(f"sbatch failed: {done.stderr}")
    return statistics.median(walls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--poll", type=float, nargs="+", default=[0.5, 2.0], help="Slurm backend poll intervals")
    args = parser.parse_args()
    image = ensure_offline_image(progress=lambda line: print(line, flush=True))
    cluster = SlurmCluster("autoresearch-bench-slurm").start()
    try:
        with tempfile.TemporaryDirectory(dir=cluster.shared) as tmp:
            root = Path(tmp)
            docker = DockerBackend("bench")
            try:
                rows = [("docker", _median_stage(docker, image, root, "docker", args.repeats))]
            finally:
                docker.close()
            for poll in args.poll:
                slurm = SlurmBackend("bench", SlurmOptions(
                    shared_dir=cluster.shared, partition=PARTITION, account="lab", poll_s=poll, time_slack_s=60,
                    slurm_conf=cluster.conf, jobcomp_log=cluster.jobcomp))
                rows.append((f"slurm poll {poll:g}s", _median_stage(slurm, image, root, f"slurm{poll:g}", args.repeats)))
            sbatch = _sbatch_latency(cluster, root, args.repeats)
    finally:
        cluster.stop()
    base = rows[0][1]
    print(f"\ntrivial stage (python3 -c pass), median of {args.repeats}:")
    print(f"{'backend':<18}{'median s':>10}{'vs docker':>12}")
    for label, median in rows:
        print(f"{label:<18}{median:>10.2f}{median - base:>+12.2f}")
    print(f"one `sbatch --parsable` call: {sbatch * 1000:.0f} ms (median)")


if __name__ == "__main__":
    main()
