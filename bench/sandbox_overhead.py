"""Median wall seconds of one sandboxed stage, Docker vs local, side by side (create+start+exit+remove).

    .venv/bin/python bench/sandbox_overhead.py [--repeats 5] [--train-seconds 10]

Two workloads: a trivial command (`python3 -c pass`), and a tiny training of `--train-seconds`
through the trusted harness (train stage only). Needs Docker and builds/uses the offline image.
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
from sandbox.local_backend import LocalBackend  # noqa: E402
from sandbox.spec import Limits, Mount, RunSpec  # noqa: E402


def _stdlib_data(root: Path) -> Path:
    import shutil
    import sysconfig

    from trainer.prepare import prepare_data

    corpus = root / "corpus"
    corpus.mkdir()
    copied = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if path.stat().st_size <= 60_000 and copied < 1_500_000:
            shutil.copy(path, corpus / path.name)
            copied += path.stat().st_size
    return Path(prepare_data(str(corpus), root / "data", vocab_size=512, progress=lambda _: None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-seconds", type=float, default=10.0)
    args = parser.parse_args()
    image = ensure_offline_image(progress=lambda line: print(line, flush=True))
    backends = {"docker": DockerBackend("bench"), "local": LocalBackend("bench")}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("preparing a tiny data set...", flush=True)
        data = _stdlib_data(root)
        candidate = root / "candidate"
        candidate.mkdir()
        (candidate / "train.py").write_text((REPO_ROOT / "trainer" / "train.py").read_text())
        workloads = {
            "trivial": (("python3", "-c", "pass"), {}, ()),
            f"train {args.train_seconds:g}s": (
                ("python3", "-m", "trainer.harness", "train", "--candidate", "/candidate/train.py",
                 "--data", "/data", "--out", "/out"),
                {"AUTORESEARCH_TIME_BUDGET": str(args.train_seconds), "AUTORESEARCH_PRESET": "tiny",
                 "PYTHONPATH": "/opt/autoresearch"},
                (Mount(REPO_ROOT / "trainer", "/opt/autoresearch/trainer"), Mount(candidate, "/candidate"),
                 Mount(data / "train", "/data")),
            ),
        }
        print(f"{'workload':<16}{'docker median s':>18}{'local median s':>18}{'docker - local':>18}")
        for label, (command, env, mounts) in workloads.items():
            medians = {}
            for kind, backend in backends.items():
                walls = []
                for i in range(args.repeats):
                    out = root / f"{kind}-{label.split()[0]}-{i}"
                    spec = RunSpec(name=f"autoresearch-bench-{kind}-{label.split()[0]}-{i}", command=command,
                                   image=image, mounts=(*mounts, Mount(out, "/out", True)), env=dict(env),
                                   limits=Limits(timeout_s=args.train_seconds * 10 + 60, memory_bytes=4 * 1024**3))
                    started = time.monotonic()
                    result = backend.run(spec)
                    walls.append(time.monotonic() - started)
                    if not result.ok:
                        sys.exit(f"{kind} {label} run {i} ended {result.status.value}: {result.output_tail[-500:]}")
                    print(f"  {kind} {label} run {i + 1}/{args.repeats}: {walls[-1]:.2f} s", flush=True)
                medians[kind] = statistics.median(walls)
            diff = medians["docker"] - medians["local"]
            print(f"{label:<16}{medians['docker']:>18.2f}{medians['local']:>18.2f}{diff:>18.2f}", flush=True)


if __name__ == "__main__":
    main()
