"""What a crashing candidate costs: a full run (old) against a smoke run (new), on this machine's CPU.

Runs two candidates through the real `StageRunner` on the local sandbox backend, each twice: once as a
full run with the given training budget (what a crash cost before smoke runs), once as the smoke run the
session now does first (`daemon.research.smoke`: tiny preset, `training.smoke_budget_s`, small eval, CPU).
The candidates: the baseline train.py, and the baseline with a NameError at the end of training (before the
export: the costliest crash, a full budget lost). Prints wall seconds side by side.

    python bench/smoke_run.py [--budget 60] [--data DIR]   # DIR: prepared data (default: a small stdlib corpus)
"""

from __future__ import annotations

import argparse
import re
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

from daemon.config import load_settings
from daemon.research.smoke import smoke_stage_runner
from daemon.research.workspace import Workspace
from daemon.service.runtime import choose_backend, make_runner
from trainer.prepare import prepare_data

REPO = Path(__file__).resolve().parents[1]


def _data(folder: Path) -> Path:
    corpus = folder / "corpus"
    corpus.mkdir()
    copied = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if path.stat().st_size <= 60_000:
            shutil.copy(path, corpus / path.name)
            copied += path.stat().st_size
        if copied > 1_500_000:
            break
    return prepare_data(str(corpus), folder / "data", vocab_size=512, progress=lambda _: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds of the full run")
    parser.add_argument("--data", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="smoke-bench-") as tmp:
        folder = Path(tmp)
        data = args.data or _data(folder)
        workspace = Workspace.init(folder / "ws")
        settings = load_settings(None, workspace=workspace.root, data={"dir": str(data)},
                                 sandbox={"backend": "local"},
                                 training={"preset": "cpu", "time_budget_s": args.budget, "eval_tokens": 8192,
                                           "probe_floor": False})
        full = make_runner(settings, choose_backend(settings, daemon=False), workspace, None)  # type: ignore[arg-type]
        smoke = smoke_stage_runner(full, settings)
        assert smoke is not None
        baseline = (REPO / "trainer" / "train.py").read_text()
        marker = re.search(r"^( +)print\(f\"training done", baseline, re.MULTILINE)
        assert marker is not None, "train.py no longer prints 'training done'"
        crashing = baseline.replace(marker.group(0), f"{marker.group(1)}rope_scale += 1\n{marker.group(0)}", 1)
        print(f"{'candidate':<12} {'full run (old)':>22} {'smoke run (new)':>22}")
        for number, (name, source) in enumerate((("crashing", crashing), ("baseline", baseline)), start=1):
            cells = []
            for runner in (full, smoke):
                started = time.monotonic()
                outcome = runner.run(number, 1, source, seed=0)
                cells.append(f"{outcome.status:>9} {time.monotonic() - started:8.1f} s")
            print(f"{name:<12} {cells[0]:>22} {cells[1]:>22}")


if __name__ == "__main__":
    main()
