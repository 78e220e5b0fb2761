"""The CLI's command handlers: each takes the parsed args and settings and returns an exit code."""

from __future__ import annotations

import argparse
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from daemon.cli import doctor
from daemon.cli.tables import render_table
from daemon.config import Settings
from daemon.errors import (
    AutoresearchError,
    DatabaseUnreachable,
    InvalidProposal,
    NothingYet,
    SchemaNotAtHead,
    UsageError,
    WorkspaceError,
)
from daemon.ops.logs import get_logger
from daemon.research.stop import StopCondition

log = get_logger("autoresearch.cli")
EXPERIMENT_HEADERS = ("id", "kind", "status", "val_bpb", "lane", "attempt", "commit", "description")


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    checks = doctor.run_checks(settings)
    print(doctor.render(checks))
    code = doctor.exit_code(checks)
    if getattr(args, "gpu", False):
        from daemon.cli.gpu_smoke import run_gpu_smoke

        report = run_gpu_smoke(settings, progress=lambda line: print(f"  {line}", flush=True))
        print(f"\n{report.render()}")
        code = code if report.ok else max(code, 1)
    return code


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.research.workspace import Workspace

    root = args.dir if args.dir is not None else settings.workspace
    workspace = Workspace.init(root)
    print(f"workspace ready: {workspace.root}")
    if args.dir is not None and args.dir.resolve() != settings.workspace.resolve():
        settings = settings.model_copy(update={"workspace": args.dir})
    _create_schema(settings)
    print(f"  edit {workspace.program_path} (the research directive) and review {workspace.train_path}")
    print(f"  next: cd {workspace.root} && autoresearch prepare && autoresearch once -n 5")
    return 0


def _create_schema(settings: Settings) -> None:
    """`init` leaves a database ready to use: its schema migrated to head (under the daemon lock)."""
    from daemon.store.migrate import schema_state

    try:
        current, head = schema_state(settings.database_url)
    except Exception as exc:
        raise DatabaseUnreachable(f"database {database_label(settings.database_url)} unreachable: "
                                  f"{database_reason(exc)}", hint="check database.url, then `autoresearch db upgrade`"
                                  ) from None
    if current == head:
        print(f"database schema {head} (current)")
        return
    migrate_under_lock(settings, "upgrade", None, None if current is None else settings.workspace / "backups")


def cmd_prepare(args: argparse.Namespace, settings: Settings) -> int:
    from trainer.prepare import prepare_data

    source = args.source or settings.data.source
    vocab_size = args.vocab_size or settings.data.vocab_size
    print(f"preparing data from {source!r} into {settings.data_dir} (vocab {vocab_size})", flush=True)
    try:
        out = prepare_data(source, settings.data_dir, vocab_size=vocab_size,
                           progress=lambda line: print(f"  {line}", flush=True))
    except (OSError, ValueError) as exc:
        raise AutoresearchError(f"data preparation failed: {exc}",
                                hint="check --source (a folder, a file, parquet URLs, or 'stdlib')") from None
    print(f"data ready: {out}")
    return 0


@contextmanager
def _signals_stop(stop_for: Any) -> Iterator[None]:
    """SIGTERM/SIGINT: the first finishes running work within the grace period, the second kills it."""
    def handler(signum: int, _frame: object) -> None:
        stop_for().signal(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _print_session(runtime: Any, session_id: int) -> None:
    rows = runtime.store.list_experiments(session_id=session_id, limit=1000)
    print(_experiments_table(list(reversed(rows))))
    print(f"results: {runtime.workspace.results_path}")


def cmd_once(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.research import ResearchSession
    from daemon.service.runtime import open_runtime

    if args.budget is not None:
        if args.budget <= 0:
            raise UsageError(f"--budget must be positive, got {args.budget}", hint="e.g. --budget 60")
        settings.training.time_budget_s = args.budget
    if args.experiments is not None and args.experiments < 0:
        raise UsageError(f"--experiments must be >= 0, got {args.experiments}",
                                hint="0 measures only the baseline and noise floor")
    if args.minutes is not None and args.minutes <= 0:
        raise UsageError(f"--minutes must be positive, got {args.minutes}", hint="e.g. --minutes 30")
    runtime = open_runtime(settings, daemon=False)
    try:
        stop = StopCondition.for_duration(args.minutes * 60 if args.minutes else None, settings.scheduler.grace_s)
        session = ResearchSession(
            settings=settings, store=runtime.store, workspace=runtime.workspace, runner=runtime.runner,
            agent=runtime.agent, lanes=runtime.lanes, owner=runtime.owner, metrics=runtime.metrics,
            heartbeat=runtime.heartbeat, trigger="once", max_experiments=args.experiments,
            cost_since=runtime.cost_since, live=runtime.live)
        record = session.open(orphans=runtime.reconciled.interrupted)
        print(f"session {record.id} ({record.tag}): lanes {', '.join(lane.name for lane in runtime.lanes)}, "
              f"budget {settings.training.time_budget_s:g} s, agent {runtime.agent.name}", flush=True)
        with _signals_stop(lambda: stop):
            summary = session.run(stop)
        _print_session(runtime, summary.session_id)
        print(f"session {summary.session_id} {summary.status}: {summary.stop_reason}; "
              f"baseline {summary.baseline_val_bpb}, best {summary.best_val_bpb}")
        if summary.status == "failed":
            raise AutoresearchError(f"the session stopped: {summary.stop_reason}",
                                    hint="see the log lines above and `autoresearch experiments`")
        return 0
    finally:
        runtime.close()


def cmd_try(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.agents.edits import validate_candidate
    from daemon.research import ResearchSession, unified_diff
    from daemon.service.runtime import open_runtime

    path: Path = args.path
    try:
        source = path.read_text()
    except OSError as exc:
        raise AutoresearchError(f"cannot read {path}: {exc.strerror}", hint="give the path of a train.py") from None
    runtime = open_runtime(settings, daemon=False, serve_http=False)
    try:
        target = next((s for s in runtime.store.list_sessions(50) if runtime.store.baseline(s.id) is not None), None)
        if target is None:
            raise WorkspaceError("no session has a measured baseline to compare against",
                                 hint="run `autoresearch once -n 0` first (baseline + noise floor)")
        try:
            source_hash = validate_candidate(source, runtime.store.seen_hashes(target.id))
        except InvalidProposal as exc:
            raise AutoresearchError(f"{path} was not run: {exc}", hint="fix the file and try again") from None
        best = runtime.store.best(target.id)
        record = runtime.store.create_experiment(
            target.id, "manual", source, parent_id=best.id if best else None,
            description=args.description or f"manual: {path.name}", hypothesis="hand-written by a researcher",
            diff=unified_diff(best.source, source) if best else "", source_hash=source_hash)
        session = ResearchSession(
            settings=settings, store=runtime.store, workspace=runtime.workspace, runner=runtime.runner,
            agent=runtime.agent, lanes=runtime.lanes[:1], owner=runtime.owner, metrics=runtime.metrics,
            trigger="try", max_experiments=0)
        session.open(attach_to=target.id)
        stop = StopCondition.for_duration(None, settings.scheduler.grace_s)
        with _signals_stop(lambda: stop):
            session.run(stop)
        final = runtime.store.get_experiment(record.id)
        best_after = runtime.store.best(target.id)
        print(_experiments_table([final]))
        print(f"experiment {final.id} {final.status}: val_bpb {final.val_bpb}, "
              f"best {best.val_bpb if best else None} -> {best_after.val_bpb if best_after else None}")
        if final.error:
            print(f"error: {final.error}")
        return 0 if final.status in ("kept", "discarded") else 1
    finally:
        runtime.close()


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.research.corpus_check import check_corpus_for_gpu
    from daemon.service.runtime import default_probe
    from daemon.service.serve import serve

    # On a GPU, a corpus a night would read many times over is refused before anything starts.
    check_corpus_for_gpu(settings.data_dir, settings.training.time_budget_s, settings.training.preset,
                         len(default_probe().gpus()))
    return serve(settings)


def _open_store(settings: Settings) -> Any:
    from daemon.store import open_store

    store = open_store(settings.database_url, retry_seconds=min(settings.database.retry_seconds, 10.0))
    try:
        from daemon.store.migrate import schema_state

        current, _head = schema_state(settings.database_url)
    except Exception as exc:  # unreachable server, bad URL: the driver's whole reason, with the fix
        store.close()
        raise DatabaseUnreachable(f"database {database_label(settings.database_url)} unreachable: "
                                  f"{database_reason(exc)}", hint="check database.url (and that the server runs)"
                                  ) from None
    if current is None:
        store.close()
        raise SchemaNotAtHead("the database has no schema yet",
                              hint="run `autoresearch db upgrade` (or `autoresearch init`)")
    return store


def database_label(url: str) -> str:
    """The database's URL without its credentials (what an error may show)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True).split("@")[-1]
    except Exception:  # an unparsable URL shows nothing of itself
        return "(unparsable URL)"


def database_reason(exc: BaseException) -> str:
    """The driver's reason in full (every line joined), without SQLAlchemy's background link."""
    text = str(getattr(exc, "orig", None) or exc)
    lines = [line.strip() for line in text.splitlines() if line.strip() and "sqlalche.me" not in line]
    return " ".join(lines)[:2000] or type(exc).__name__


def _experiments_table(rows: list[Any]) -> str:
    return render_table(EXPERIMENT_HEADERS, [
        (r.id, r.kind, r.status, r.val_bpb, r.lane, r.attempt, (r.commit or "")[:10], r.description)
        for r in rows])


def _session_or_latest(store: Any, session_id: int | None) -> Any:
    session = store.get_session(session_id) if session_id is not None else store.latest_session()
    if session is None:
        raise NothingYet(f"no session {session_id}" if session_id is not None else "no session yet",
                                hint="run `autoresearch once` (or the daemon) first")
    return session








def cmd_retest(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.ops.retest_report import night_headline
    from daemon.service.retesting import retest_session
    from daemon.service.runtime import open_runtime

    if args.k is not None:
        if args.k < 1:
            raise AutoresearchError(f"--k must be >= 1, got {args.k}", hint="e.g. --k 3")
        settings.retest.k = args.k
    runtime = open_runtime(settings, daemon=False, serve_http=False)
    try:
        session = _session_or_latest(runtime.store, args.session)
        print(f"re-testing session {session.id} ({session.tag}): k {settings.retest.k} fresh seeds per side, "
              f"budget {settings.training.time_budget_s:g} s", flush=True)
        stop = StopCondition.for_duration(None, settings.scheduler.grace_s)
        latest = runtime.store.latest_session()
        with _signals_stop(lambda: stop):
            found = retest_session(runtime, session.id, stop,
                                   write_results=latest is not None and latest.id == session.id)
    finally:
        runtime.close()
    if not found:
        raise AutoresearchError(f"the re-test of session {session.id} failed", hint="see the log lines above")
    print(render_table(("re-test", "label", "base", "best", "pairs", "delta", "half-width", "verdict", "note"), [
        (c.retest.id, c.retest.label, c.retest.base_id, c.retest.best_id, c.pairs,
         "-" if c.delta is None else f"{c.delta:+.6f}", "-" if c.half_width is None else f"{c.half_width:.6f}",
         c.verdict, c.retest.note) for c in found]))
    print(night_headline(found, settings.retest.confidence))
    print(f"report: autoresearch report --session {session.id}")
    return 0


def cmd_notebook(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.cli.notebook import run_notebook

    store = _open_store(settings)
    try:
        return run_notebook(args.action, store, file=args.file, reason=args.reason)
    finally:
        store.close()




def cmd_reap(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.service.lock import DaemonLock
    from daemon.service.reconcile import reconcile
    from daemon.service.runtime import choose_backend
    from daemon.store import open_store

    # The runs of the daemon holding the lock (in any PID namespace) are left alone; all others are reaped.
    lock = DaemonLock(settings.database_url, settings.instance_name)
    store = open_store(settings.database_url, retry_seconds=min(settings.database.retry_seconds, 10.0))
    try:
        result = reconcile(store, choose_backend(settings, daemon=False), settings.instance_name,
                           owner_alive=lock.owner_alive)
    finally:
        store.close()
    print(f"reaped {len(result.reaped)} sandbox run(s)" + "".join(f"\n  {line}" for line in result.reaped))
    print(f"interrupted {len(result.interrupted)} orphaned experiment(s): {list(result.interrupted)}")
    print(f"requeued {len(result.requeued)} experiment(s) with expired leases: {list(result.requeued)}")
    return 0


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    """upgrade / downgrade (under the daemon lock, after a backup), current (exit 6 when not at head), backup."""
    from daemon.store.migrate import schema_state

    try:
        current, head = schema_state(settings.database_url)
    except AutoresearchError:
        raise
    except Exception as exc:
        raise DatabaseUnreachable(f"database {database_label(settings.database_url)} unreachable: "
                                  f"{database_reason(exc)}", hint="check database.url") from None
    if args.action == "current":
        print(f"schema {current or 'none'} (code wants {head})" + (" - run `autoresearch db upgrade`"
                                                                     if current != head else ""))
        if current != head:
            raise SchemaNotAtHead(f"the database schema is {current or 'empty'}, this version's head is {head}",
                                  hint="`autoresearch db upgrade` (or install the version that migrated it)")
        return 0
    out_dir = args.out or settings.workspace / "backups"
    if args.action == "backup":
        from daemon.store.backup import backup_database

        print(f"backup: {backup_database(settings.database_url, out_dir, current)}")
        return 0
    if args.action == "downgrade" and not args.to:
        raise UsageError("`db downgrade` needs --to REVISION", hint="e.g. autoresearch db downgrade --to 0005")
    backup = not args.no_backup and settings.database.backup_before_upgrade
    return migrate_under_lock(settings, args.action, args.to, out_dir if backup else None)


def migrate_under_lock(settings: Settings, action: str, target: str | None, backup_dir: Path | None) -> int:
    """Take the daemon's lock (refused, naming the holder and its version, while a daemon runs), back the
    database up, then migrate up to head or down to `target`; the lock is released whatever happens."""
    from daemon.service.lock import DaemonLock
    from daemon.store import open_store
    from daemon.store.migrate import schema_state
    from sandbox.labels import owner_id

    lock = DaemonLock(settings.database_url, settings.instance_name)
    lock.acquire(owner_id(settings.instance_name))
    try:
        current, head = schema_state(settings.database_url)
        if action == "upgrade" and current == head:
            print(f"schema {current} is already at head: nothing to do")
            return 0
        if backup_dir is not None and current is not None:
            from daemon.store.backup import backup_database

            print(f"backup: {backup_database(settings.database_url, backup_dir, current)}", flush=True)
        store = open_store(settings.database_url)
        try:
            if action == "upgrade":
                store.upgrade()
            else:
                assert target is not None
                store.downgrade(target)
        finally:
            store.close()
        after, head = schema_state(settings.database_url)
        print(f"schema {current or 'none'} -> {after} (code wants {head})")
        return 0
    finally:
        lock.release()


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    from daemon.research.workspace import Workspace
    from daemon.service.housekeeping import prune_all

    runs_dir = Workspace(settings.workspace).runs_dir
    report = prune_all(settings, runs_dir, dry_run=args.dry_run)
    for line in report.lines():
        print(line)
    return 0


def cmd_image(args: argparse.Namespace, settings: Settings) -> int:
    from sandbox.errors import SandboxError
    from sandbox.images import PYPI_INDEX, build_production_image, ensure_offline_image

    def progress(line: str) -> None:
        print(f"  {line}", flush=True)

    try:
        if args.offline:
            tag = ensure_offline_image(args.tag or settings.sandbox.image, progress=progress)
        else:
            tag = build_production_image(args.tag or settings.sandbox.image, progress=progress,
                                         variant=getattr(args, "variant", "auto"),
                                         base=getattr(args, "base", "debootstrap"),
                                         torch_index=getattr(args, "torch_index", None) or PYPI_INDEX,
                                         force=getattr(args, "force", False))
    except SandboxError as exc:
        raise AutoresearchError(f"image build failed: {exc}", hint="see `autoresearch doctor`") from None
    print(f"image ready: {tag}")
    return 0

