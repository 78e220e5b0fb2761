"""The `autoresearch` command line: argument parsing and dispatch; the work lives in `daemon.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from daemon.config import Settings, load_settings
from daemon.errors import AutoresearchError
from daemon.logs import configure_logging

# command name -> handler in daemon.commands (each: (args, settings) -> exit code)
HANDLERS = {
    "init": "cmd_init",
    "prepare": "cmd_prepare",
    "run": "cmd_run",
    "once": "cmd_once",
    "try": "cmd_try",
    "status": "cmd_status",
    "experiments": "cmd_experiments",
    "best": "cmd_best",
    "report": "cmd_report",
    "reap": "cmd_reap",
    "db": "cmd_db",
    "image": "cmd_image",
    "doctor": "cmd_doctor",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoresearch",
        description="Let an LLM agent run small-GPT pretraining research on this machine's GPUs, overnight.",
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML config file (default ./autoresearch.toml)")
    parser.add_argument("--workspace", type=Path, default=None, help="override the configured workspace")
    parser.add_argument("--log-json", action="store_true", default=None, help="JSON log lines even on a terminal")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create a workspace: program.md, baseline train.py, git repo, config")
    p.add_argument("dir", type=Path, nargs="?", default=None, help="workspace folder (default: configured)")

    p = sub.add_parser("prepare", help="download/collect data, train the tokenizer, pre-tokenize (idempotent)")
    p.add_argument("--source", default=None, help="'stdlib', a local file/folder, or parquet URLs (comma separated)")
    p.add_argument("--vocab-size", type=int, default=None)

    sub.add_parser("run", help="the daemon: open windows on schedule, harvest idle GPUs, run experiments")

    p = sub.add_parser("once", help="one research session now, in the foreground")
    p.add_argument("--experiments", "-n", type=int, default=None, help="stop after N candidate experiments")
    p.add_argument("--minutes", type=float, default=None, help="stop after this many minutes")
    p.add_argument("--budget", type=float, default=None, help="training seconds per experiment (overrides config)")

    p = sub.add_parser("try", help="run a hand-written train.py as a candidate against the current best")
    p.add_argument("path", type=Path)
    p.add_argument("--description", "-m", default=None)

    sub.add_parser("status", help="window, lanes, running experiments, best, tonight's cost")

    p = sub.add_parser("experiments", help="table of experiments")
    p.add_argument("--session", type=int, default=None)
    p.add_argument("--status", default=None, help="only this status (kept, discarded, crashed, ...)")
    p.add_argument("--limit", type=int, default=50)

    sub.add_parser("best", help="best val_bpb and its diff against the baseline")

    p = sub.add_parser("report", help="morning report: markdown + PNG chart (+ results.tsv)")
    p.add_argument("--session", type=int, default=None, help="session id (default: latest)")
    p.add_argument("--out", type=Path, default=None, help="folder for the report (default <workspace>/reports)")

    sub.add_parser("reap", help="reconcile leftover sandbox containers carrying our labels")

    p = sub.add_parser("db", help="database schema")
    p.add_argument("action", choices=["upgrade", "current"])

    p = sub.add_parser("image", help="trainer image")
    p.add_argument("action", choices=["build"])
    p.add_argument("--offline", action="store_true", help="build the CPU test image offline (debootstrap + local torch wheel)")
    p.add_argument("--tag", default=None)

    sub.add_parser("doctor", help="check this machine: Python, torch/CUDA, Docker, image, database, port, API key")
    return parser


def _settings_for(args: argparse.Namespace) -> Settings:
    overrides = {}
    if args.workspace is not None:
        overrides["workspace"] = args.workspace
    return load_settings(args.config, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings_for(args)
        configure_logging(settings.log_level, json=args.log_json)
        commands = importlib.import_module("daemon.commands")
        handler = getattr(commands, HANDLERS[args.command])
        return int(handler(args, settings))
    except AutoresearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"  what to do: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
