"""One real research session in Docker with the offline agent, then `autoresearch try` and `report` as the real CLI.

The module runs the session once (baseline from a deliberately handicapped train.py, one noise run, two
offline-agent candidates) while the daemon's HTTP endpoint serves; then a hand-written train.py with sane
learning rates goes through `autoresearch try`, which must keep it (a commit on the session branch); then
`autoresearch report` writes the morning report. Every test asserts on that one finished session.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.research import ResearchSession, SessionSummary
from daemon.research.stop import StopCondition
from daemon.research.workspace import Workspace
from daemon.service.runtime import open_runtime
from daemon.store import open_store
from daemon.store.records import ExperimentRecord
from tests.e2e.support import empty_database, free_port, handicapped, http_get, settings_env, tiny_settings

pytestmark = [pytest.mark.docker, pytest.mark.postgres, pytest.mark.slow]

CANDIDATES = 2
FINISHED = ("kept", "discarded", "measured", "crashed", "timeout", "oom", "invalid")


@dataclass
class DockerSession:
    workspace: Workspace
    summary: SessionSummary
    rows: list[ExperimentRecord]  # every experiment of the session after `try`, oldest first
    metrics_text: str  # /metrics scraped over HTTP right after the session
    health: tuple[int, str]
    status_page: tuple[int, str]  # `/` right after the session
    try_output: str
    report_output: str
    reports_dir: Path
    cli_outputs: dict[str, str]  # stdout of `status`, `experiments --status kept`, `best` after the session


@pytest.fixture(scope="module")
def docker_session(tmp_path_factory: pytest.TempPathFactory, prepared_data: Path, baseline_source: str,
                   postgres_url: str, trainer_image: str) -> Iterator[DockerSession]:
    import subprocess

    from tests.conftest import REPO_ROOT

    root = tmp_path_factory.mktemp("docker-e2e")
    workspace = Workspace.init(root / "ws", baseline_source=handicapped(baseline_source))
    port = free_port()
    settings = tiny_settings(
        workspace.root, empty_database(postgres_url), prepared_data,
        sandbox={"backend": "docker", "image": trainer_image}, judge={"noise_runs": 1}, metrics={"port": port})
    runtime = open_runtime(settings, daemon=True)
    try:
        session = ResearchSession(
            settings=settings, store=runtime.store, workspace=runtime.workspace, runner=runtime.runner,
            agent=runtime.agent, lanes=runtime.lanes, owner=runtime.owner, metrics=runtime.metrics,
            heartbeat=runtime.heartbeat, max_experiments=CANDIDATES, cost_since=runtime.cost_since,
            live=runtime.live)
        session.open()
        summary = session.run(StopCondition(grace_s=60))
        metrics_text = http_get(f"http://127.0.0.1:{port}/metrics")[1]
        health = http_get(f"http://127.0.0.1:{port}/healthz")
        status_page = http_get(f"http://127.0.0.1:{port}/")
    finally:
        runtime.close()
    good = root / "good_train.py"
    good.write_text(baseline_source)  # the shipped learning rates: far better than the handicapped baseline
    env = {"PATH": "/usr/bin:/bin", **settings_env(settings), "AUTORESEARCH_METRICS__PORT": "0"}
    exe = str(Path(REPO_ROOT / ".venv" / "bin" / "autoresearch"))
    tried = subprocess.run([exe, "try", str(good), "--description", "sane learning rates"], cwd=workspace.root,
                           env=env, text=True, capture_output=True, timeout=300, check=False)
    assert tried.returncode == 0, tried.stdout[-2000:] + tried.stderr[-3000:]
    reports = root / "reports"
    reported = subprocess.run([exe, "report", "--out", str(reports)], cwd=workspace.root, env=env, text=True,
                              capture_output=True, timeout=120, check=False)
    assert reported.returncode == 0, reported.stderr[-3000:]
    cli_outputs = {}
    for command in (["status"], ["experiments", "--status", "kept"], ["best"]):
        done = subprocess.run([exe, *command], cwd=workspace.root, env=env, text=True, capture_output=True,
                              timeout=60, check=False)
        # status exits 3: no daemon answers (this session ran in-process); it still shows the database's state
        assert done.returncode == (3 if command[0] == "status" else 0), done.stderr[-3000:]
        cli_outputs[command[0]] = done.stdout
    store = open_store(settings.database_url)
    try:
        rows = sorted(store.list_experiments(session_id=summary.session_id, limit=1000), key=lambda r: r.id)
    finally:
        store.close()
    yield DockerSession(workspace, summary, rows, metrics_text, health, status_page, tried.stdout, reported.stdout, reports,
                        cli_outputs)


def test_session_runs_baseline_noise_and_candidates_in_order(docker_session: DockerSession) -> None:
    """The session measures the baseline, one noise run, then exactly the requested number of candidates."""
    rows = docker_session.rows
    assert [(r.kind, r.status) for r in rows[:2]] == [("baseline", "kept"), ("noise", "measured")]
    candidates = [r for r in rows if r.kind == "candidate"]
    assert len(candidates) == CANDIDATES
    assert all(r.status in FINISHED for r in rows)
    assert docker_session.summary.status == "completed"
    assert docker_session.summary.stop_reason == "experiment count reached"


def test_every_measured_row_has_eval_metrics_and_a_passed_probe(docker_session: DockerSession) -> None:
    """Rows that were measured carry val_bpb from the eval stage, the probe verdict and training numbers."""
    measured = [r for r in docker_session.rows if r.val_bpb is not None]
    assert len(measured) >= 3
    for row in measured:
        assert row.probe == "passed", (row.id, row.probe)
        assert row.eval_seconds is not None and row.num_steps is not None and row.num_steps > 0
        assert row.lane == "cpu" and row.exit_code == 0 and row.oom is False


def test_candidates_record_their_diff_against_the_parent(docker_session: DockerSession) -> None:
    """Each agent candidate names its parent, says what changed, and stores the unified diff of that change."""
    baseline = docker_session.rows[0]
    for row in (r for r in docker_session.rows if r.kind == "candidate"):
        assert row.parent_id is not None and row.description
        assert row.diff.startswith("--- a/train.py") and row.source != baseline.source


def test_try_keeps_the_clearly_better_manual_train_py(docker_session: DockerSession) -> None:
    """`autoresearch try` runs a hand-written train.py like a candidate and keeps it when it beats the best."""
    manual = [r for r in docker_session.rows if r.kind == "manual"]
    assert len(manual) == 1 and manual[0].status == "kept", docker_session.try_output
    baseline = docker_session.rows[0]
    assert manual[0].val_bpb is not None and baseline.val_bpb is not None
    assert manual[0].val_bpb < baseline.val_bpb
    assert f"experiment {manual[0].id} kept" in docker_session.try_output


def test_kept_experiments_are_commits_on_the_session_branch(docker_session: DockerSession) -> None:
    """Every kept experiment after the baseline is one commit on autoresearch/<tag>, newest first."""
    kept = [r for r in docker_session.rows if r.status == "kept" and r.kind != "baseline"]
    subjects = docker_session.workspace.branch_log(docker_session.summary.tag)
    assert len(subjects) == len(kept)
    assert subjects[0].startswith("sane learning rates")
    assert all(r.commit and len(r.commit) == 40 for r in kept)
    assert docker_session.rows[0].commit == docker_session.workspace.main_commit()


def test_results_tsv_lists_every_finished_experiment(docker_session: DockerSession) -> None:
    """results.tsv has the original five columns and one line per finished experiment, crashes as `crash`."""
    lines = docker_session.workspace.results_path.read_text().splitlines()
    assert lines[0].split("\t") == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert len(lines) == 1 + len(docker_session.rows)
    for line, row in zip(lines[1:], docker_session.rows, strict=True):
        commit, val_bpb, _memory, status, description = line.split("\t")
        assert len(commit) == 7
        assert status in ("keep", "discard", "crash", "measured", "kept", "discarded"), status
        if row.val_bpb is not None:
            assert float(val_bpb) == pytest.approx(row.val_bpb, abs=1e-6)
        assert description == row.description.replace("\n", " ").strip()


def test_report_command_writes_markdown_chart_and_tsv(docker_session: DockerSession) -> None:
    """`autoresearch report` writes report.md (naming the best), val_bpb.png and results.tsv for the session."""
    folder = docker_session.reports_dir / f"session-{docker_session.summary.session_id}"
    assert f"report: {folder / 'report.md'}" in docker_session.report_output
    markdown = (folder / "report.md").read_text()
    best = min(r.val_bpb for r in docker_session.rows if r.status == "kept" and r.val_bpb is not None)
    assert f"{best:.6f}" in markdown and "sane learning rates" in markdown
    assert (folder / "val_bpb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "results.tsv").read_text().count("\n") == 1 + len(docker_session.rows)


def test_metrics_endpoint_served_the_session_over_http(docker_session: DockerSession) -> None:
    """/metrics (scraped over HTTP) counts the session's experiments by kind and status and shows the numbers."""
    text = docker_session.metrics_text
    rows = [r for r in docker_session.rows if r.kind != "manual"]
    assert 'autoresearch_experiments_total{kind="baseline",lane="cpu",status="kept"} 1.0' in text
    assert 'autoresearch_experiments_total{kind="noise",lane="cpu",status="measured"} 1.0' in text
    candidates = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("autoresearch_experiments_total{") and 'kind="candidate"' in line)
    assert candidates == CANDIDATES
    assert f"autoresearch_baseline_val_bpb {rows[0].val_bpb}" in text
    assert 'autoresearch_stage_duration_seconds_count{stage="eval"}' in text
    assert docker_session.health == (200, "ok\n")


def test_status_page_lists_the_sessions_experiments(docker_session: DockerSession) -> None:
    """The built-in status page `/` shows every experiment of the session and the val_bpb chart."""
    status, page = docker_session.status_page
    assert status == 200
    # The page was read right after the session: the `try` run (and any confirmation of it) came later.
    tried = min((r.id for r in docker_session.rows if r.kind == "manual"), default=None)
    for row in (r for r in docker_session.rows if tried is None or r.id < tried):
        assert html.escape(row.description) in page, row.description
    assert "<svg" in page


def test_status_experiments_and_best_commands_show_the_session(docker_session: DockerSession) -> None:
    """`status`, `experiments --status kept` and `best` print readable tables that agree with the database."""
    kept = [r for r in docker_session.rows if r.status == "kept"]
    best = min(kept, key=lambda r: r.val_bpb if r.val_bpb is not None else float("inf"))
    baseline = next(r for r in docker_session.rows if r.kind == "baseline")
    status = docker_session.cli_outputs["status"]
    assert f"session {docker_session.summary.session_id} " in status
    assert f"best: {best.val_bpb:.6f} (experiment {best.id})" in status
    table = docker_session.cli_outputs["experiments"].splitlines()
    assert table[0].split() == ["id", "kind", "status", "val_bpb", "lane", "attempt", "commit", "description"]
    assert sorted(int(line.split()[0]) for line in table[2:]) == sorted(r.id for r in kept)
    best_text = docker_session.cli_outputs["best"]
    assert best_text.startswith(f"best val_bpb {best.val_bpb:.6f} (experiment {best.id}")
    assert f"baseline {baseline.val_bpb:.6f}" in best_text
    assert "--- a/train.py" in best_text and "+++ b/train.py" in best_text
