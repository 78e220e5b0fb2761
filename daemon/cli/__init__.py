"""The `autoresearch` command line (console script `autoresearch = "daemon.cli:main"`):

- `app`          the argument parser and dispatch (`main`);
- `commands`     the commands that act: init, prepare, run, once, try, doctor, reap, db, image;
- `readout`      read-only commands: status, experiments, best, report (each with `--json`);
- `notebook`     `autoresearch notebook`: read and edit the agent's notebook, start a research line;
- `doctor`, `doctor_slurm`, `gpu_smoke`: pre-flight checks of this machine, of Slurm, of a GPU;
- `tables`       plain-text tables for the terminal.

`main` is loaded on first call so that importing a single command module does not import them all.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `autoresearch` command line; return its exit status."""
    from daemon.cli.app import main as run_main

    return run_main(argv)
