"""The `autoresearch` command line: argument parsing and dispatch; the work lives in `daemon.cli.commands`
(and the read-only commands in `daemon.cli.readout`).

Global options (--config, --workspace, --json, --log-json) are accepted before or after the subcommand.
The config file: --config, else $AUTORESEARCH_CONFIG, else ./autoresearch.toml, else
/etc/autoresearch/autoresearch.toml (a system install), else built-in defaults.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from daemon import __version__
from daemon.cli import exits
from daemon.config import Settings, load_settings
from daemon.errors import AutoresearchError, ConfigError, UsageError
from daemon.ops.logs import configure_logging


def _path(text: str) -> Path:
    """A path argument: any text the OS can take as a path (argparse reports the rest as a usage error)."""
    if "\x00" in text:
        raise argparse.ArgumentTypeError("a path cannot contain a NUL byte")
    return Path(text)


# command name -> handler in daemon.cli.commands (each: (args, settings) -> exit code)
HANDLERS = {
    "init": "cmd_init",
    "prepare": "cmd_prepare",
    "run": "cmd_run",
    "once": "cmd_once",
    "try": "cmd_try",
    "status": "daemon.cli.readout:cmd_status",
    "experiments": "daemon.cli.readout:cmd_experiments",
    "best": "daemon.cli.readout:cmd_best",
    "report": "daemon.cli.readout:cmd_report",
    "retest": "cmd_retest",
    "reap": "cmd_reap",
    "db": "cmd_db",
    "image": "cmd_image",
    "doctor": "cmd_doctor",
    "notebook": "cmd_notebook",
    "prune": "cmd_prune",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoresearch",
        description="Let an LLM agent run small-GPT pretraining research on this machine's GPUs, overnight.",
        epilog=exits.epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"autoresearch {__version__}")
    _add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create a workspace: program.md, baseline train.py, git repo, config")
    p.add_argument("dir", type=_path, nargs="?", default=None, help="workspace folder (default: configured)")

    p = sub.add_parser("prepare", help="download/collect data, train the tokenizer, pre-tokenize (idempotent)")
    p.add_argument("--source", default=None, help="'stdlib', 'climbmix[:N]' (N shards + the pinned val shard), a local file/folder, or parquet URLs")
    p.add_argument("--vocab-size", type=int, default=None)

    sub.add_parser("run", help="the daemon: open windows on schedule, harvest idle GPUs, run experiments")

    p = sub.add_parser("once", help="one research session now, in the foreground")
    p.add_argument("--experiments", "-n", type=int, default=None, help="stop after N candidate experiments")
    p.add_argument("--minutes", type=float, default=None, help="stop after this many minutes")
    p.add_argument("--budget", type=float, default=None, help="training seconds per experiment (overrides config)")

    p = sub.add_parser("try", help="run a hand-written train.py as a candidate against the current best")
    p.add_argument("path", type=_path)
    p.add_argument("--description", "-m", default=None)

    p = sub.add_parser("status", help="is the daemon running; window, lanes (with GPUs), best, tonight's cost; "
                                      "exit 0 running, 4 unhealthy, 3 not running, 5 database unreachable")
    p.add_argument("--url", default=None,
                   help="ask the daemon at this address (e.g. http://127.0.0.1:9464): needs no config or database")

    p = sub.add_parser("experiments", help="table of experiments")
    p.add_argument("--session", type=int, default=None)
    p.add_argument("--status", default=None, help="only this status (kept, discarded, crashed, ...)")
    p.add_argument("--limit", type=int, default=50)

    sub.add_parser("best", help="best val_bpb and its diff against the baseline")

    p = sub.add_parser("report", help="morning report: markdown + PNG chart (+ results.tsv)")
    p.add_argument("--session", type=int, default=None, help="session id (default: latest)")
    p.add_argument("--out", type=_path, default=None, help="folder for the report (default <workspace>/reports)")

    p = sub.add_parser("retest", help="re-test a session's start best against its end best (and each keep against "
                       "its parent) on fresh seeds, paired: the night's gain with its interval")
    p.add_argument("--session", type=int, default=None, help="session id (default: latest)")
    p.add_argument("--k", type=int, default=None, help="fresh seeds per side (default [retest] k)")

    sub.add_parser("reap", help="reconcile leftover sandbox containers carrying our labels")

    p = sub.add_parser("db", help="database schema")
    p.add_argument("action", choices=["upgrade", "current", "downgrade", "backup"],
                   help="upgrade: take the daemon lock, back up (SQLite), migrate to head; current: exit 6 when "
                        "not at head; downgrade: to --to REVISION (lock and backup as for upgrade); backup: "
                        "a copy (SQLite) or a pg_dump (Postgres) into --out")
    p.add_argument("--to", default=None, help="downgrade: the revision to go back to (e.g. 0005)")
    p.add_argument("--out", type=_path, default=None, help="backup folder (default <workspace>/backups)")
    p.add_argument("--no-backup", action="store_true", help="upgrade/downgrade without a backup first")

    p = sub.add_parser("image", help="trainer image")
    p.add_argument("action", choices=["build"])
    p.add_argument("--offline", action="store_true", help="build the CPU test image offline (debootstrap + local torch wheel)")
    p.add_argument("--tag", default=None)
    p.add_argument("--variant", choices=["auto", "cpu", "cuda"], default="auto",
                   help="cuda: PyPI's CUDA torch; cpu: the CPU wheel; auto: from this host's NVIDIA driver")
    p.add_argument("--base", choices=["debootstrap", "public"], default="debootstrap",
                   help="debootstrap: no registry needed; public: python:3.11-slim from a registry")
    p.add_argument("--torch-index", default=None,
                   help="index for torch's wheel (default PyPI); older drivers: https://download.pytorch.org/whl/cu128")
    p.add_argument("--force", action="store_true",
                   help="build a CUDA image even though this host's driver is too old for it (another host's image)")

    p = sub.add_parser("notebook", help="the agent's notebook of the research line: show, history, edit; "
                                         "fresh starts a new line")
    p.add_argument("action", choices=["show", "history", "edit", "fresh"], nargs="?", default="show")
    p.add_argument("--file", default=None, help="edit: the new text from this file (- for stdin) instead of $EDITOR")
    p.add_argument("--reason", default="", help="fresh: why the line starts over (kept with the line)")

    p = sub.add_parser("prune", help="free disk: old trainer images and wheels, leftover run folders "
                                     "([retention]); never an image in use")
    p.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")

    p = sub.add_parser("doctor", help="check this machine: Python, torch/CUDA, Docker, image, database, port, API key")
    p.add_argument("--gpu", action="store_true",
                   help="also train and evaluate a tiny model on the GPU through the sandbox (under two minutes)")
    for name, subparser in sub.choices.items():
        _add_global_options(subparser, suppress=True, json=name in JSON_COMMANDS)
    return parser


JSON_COMMANDS = ("status", "experiments", "best", "report")


def _add_global_options(parser: argparse.ArgumentParser, *, suppress: bool, json: bool = True) -> None:
    """The options every command takes; on subcommands their default is SUPPRESS so they never undo the
    value given before the subcommand. `--json` is offered only by the commands that print JSON."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--config", type=_path, default=default(None),
                        help="TOML config file (default: $AUTORESEARCH_CONFIG, ./autoresearch.toml, "
                             "/etc/autoresearch/autoresearch.toml)")
    parser.add_argument("--workspace", type=_path, default=default(None), help="override the configured workspace")
    if json:
        parser.add_argument("--json", action="store_true", default=default(False),
                            help=f"machine-readable output ({', '.join(JSON_COMMANDS)})")
    parser.add_argument("--log-json", action="store_true", default=default(None),
                        help="JSON log lines even on a terminal")


def _settings_for(args: argparse.Namespace) -> Settings:
    overrides = {}
    if args.workspace is not None:
        overrides["workspace"] = args.workspace
    return load_settings(args.config, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, dispatch, and turn every failure into one line and an exit code from `daemon.cli.exits`."""
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((word for word in words if word in HANDLERS), None)
    options = words[:words.index("--")] if "--" in words else words
    if "--json" in options and command is not None and command not in JSON_COMMANDS:
        print(f"error: --json is not supported by `{command}`", file=sys.stderr)
        print(f"  what to do: --json works with: {', '.join(JSON_COMMANDS)}", file=sys.stderr)
        return exits.USAGE
    try:
        args = build_parser().parse_args(words)
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else exits.USAGE
    try:
        if args.json and args.command not in JSON_COMMANDS:
            raise UsageError(f"--json is not supported by `{args.command}`",
                                    hint=f"--json works with: {', '.join(JSON_COMMANDS)}")
        try:
            settings = _settings_for(args)
        except ConfigError:
            if not (args.command == "status" and getattr(args, "url", None)):
                raise
            settings = Settings.model_construct()  # status --url needs no config (e.g. one this user cannot read)
        configure_logging(settings.log_level, json=args.log_json)
        module, _, name = HANDLERS[args.command].rpartition(":")
        handler = getattr(importlib.import_module(module or "daemon.cli.commands"), name)
        return int(handler(args, settings))
    except AutoresearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"  what to do: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return exits.INTERRUPTED
    except Exception as exc:  # a bug: one line, the traceback only when asked for
        if os.environ.get("AUTORESEARCH_DEBUG"):
            traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("  what to do: run again with AUTORESEARCH_DEBUG=1 for the traceback, and report it",
              file=sys.stderr)
        return exits.INTERNAL


if __name__ == "__main__":
    sys.exit(main())
