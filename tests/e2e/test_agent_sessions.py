"""Real tiny sessions (local sandbox) driven by the real Anthropic SDK against the fake Messages API server.

Only the LLM API is fake; training, evaluation, judging, the store (Postgres) and the accounting are real.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Settings
from daemon.research import SessionSummary
from daemon.research.workspace import Workspace
from daemon.store.records import ExperimentRecord
from tests.e2e.support import agent_calls, empty_database, run_session, tiny_settings
from tests.fakes.anthropic_server import FakeAnthropicServer, RecordedRequest, Reply, error_reply, tool_reply

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

USAGE = {"input_tokens": 1000, "output_tokens": 200, "cache_read_input_tokens": 500,
         "cache_creation_input_tokens": 100}
# claude-sonnet-5-5 at the configured prices: 3 / 15 / 0.3 USD per million tokens, and 6 (twice the input price)
# for writes to the 1-hour cache the agent uses.
COST_PER_CALL = (1000 * 3.0 + 200 * 15.0 + 500 * 0.3 + 100 * 6.0) / 1e6
CRASH_MESSAGE = "scripted crash at import"


def proposal(description: str, search: str, replace: str, notebook: str = "") -> Reply:
    return tool_reply({"hypothesis": f"{description} should lower val_bpb", "edits": [{"search": search,
                       "replace": replace}], "description": description, "notebook": notebook}, usage=USAGE)


CRASHING = proposal("print less often (buggy)", "PRINT_EVERY_SECONDS = 2.0",
                    f'PRINT_EVERY_SECONDS = 2.0\nraise RuntimeError("{CRASH_MESSAGE}")')
_WARMUP_LINE = re.search(r"^WARMUP_FRACTION = [0-9.]+", (Path(__file__).resolve().parents[2] / "trainer" /
                                                           "train.py").read_text(), re.MULTILINE)
assert _WARMUP_LINE is not None, "trainer/train.py has no WARMUP_FRACTION constant"
LONGER_WARMUP = proposal("longer warm-up", _WARMUP_LINE.group(0), "WARMUP_FRACTION = 0.05")
FIXED = proposal("print less often (fixed)", "PRINT_EVERY_SECONDS = 2.0", "PRINT_EVERY_SECONDS = 3.0")
SOFTER_CAP = proposal("softer logit cap", "LOGIT_SOFTCAP = 15.0", "LOGIT_SOFTCAP = 20.0")


@pytest.fixture()
def fake_api() -> Iterator[FakeAnthropicServer]:
    with FakeAnthropicServer() as server:
        yield server


def anthropic_settings(root: Path, baseline_source: str, postgres_url: str, prepared_data: Path,
                       server: FakeAnthropicServer, training: dict[str, Any] | None = None, **agent: Any) -> Settings:
    workspace = Workspace.init(root / "ws", baseline_source=baseline_source)
    return tiny_settings(workspace.root, empty_database(postgres_url), prepared_data, training=training or {},
                         agent={"provider": "anthropic", "api_key": "sk-test", "base_url": server.url,
                                "retry_backoff_s": 0.01, "retry_wait_max_s": 0.05, **agent})


# The harness times each training phase: on a loaded CPU a 2 s budget's allowance is too tight for a night
# that must get past its baseline, so the multi-run scenarios below train for longer.
ROOMY = {"time_budget_s": 8}


@dataclass
class CrashFixSession:
    summary: SessionSummary
    rows: list[ExperimentRecord]
    requests: list[RecordedRequest]
    calls: list[dict[str, Any]]


@pytest.fixture(scope="module")
def crash_fix_session(tmp_path_factory: pytest.TempPathFactory, baseline_source: str, postgres_url: str,
                      prepared_data: Path) -> Iterator[CrashFixSession]:
    """Three candidates from the scripted API: one crashes at import, one plain, then the agent's fix."""
    with FakeAnthropicServer() as server:
        # Pipelining fixes the order: #1 during the baseline, #2 when #1 launches, #3 (the fix) after #1
        # crashed, #4 when the fix launches (prepared, never run).
        server.enqueue(CRASHING, LONGER_WARMUP, FIXED, SOFTER_CAP)
        settings = anthropic_settings(tmp_path_factory.mktemp("crash-fix"), baseline_source, postgres_url,
                                      prepared_data, server, training=ROOMY)
        summary, rows = run_session(settings, candidates=3)
        yield CrashFixSession(summary, rows, list(server.requests),
                              agent_calls(settings.database_url, summary.session_id))


def test_crashed_candidate_is_fixed_by_the_agent_through_the_real_sdk(crash_fix_session: CrashFixSession) -> None:
    """A candidate that raises at import is recorded crashed, and the agent's fix runs as the next candidate."""
    candidates = [r for r in crash_fix_session.rows if r.kind == "candidate"]
    assert [r.description for r in candidates] == [
        "print less often (buggy)", "longer warm-up", "print less often (fixed)"]
    crashed, _, fix = candidates
    assert crashed.status == "crashed" and crashed.exit_code not in (0, None) and crashed.val_bpb is None
    assert CRASH_MESSAGE in crashed.log_tail
    assert fix.status in ("kept", "discarded") and fix.val_bpb is not None, (fix.error, fix.log_tail[-3000:])
    assert "PRINT_EVERY_SECONDS = 3.0" in fix.source and CRASH_MESSAGE not in fix.source
    assert crash_fix_session.summary.status == "completed"


def test_fix_request_carries_the_fenced_crash_output(crash_fix_session: CrashFixSession) -> None:
    """Only the fix request reports the crash, with the crash output fenced as data."""
    crashed = next(r for r in crash_fix_session.rows if r.kind == "candidate")
    prompts = [request.body["messages"][0]["content"][-1]["text"] for request in crash_fix_session.requests]
    assert [f"ended `crashed` (experiment {crashed.id})" in prompt for prompt in prompts] == [
        False, False, True, False]
    fenced = re.search(r"The last lines of its output:\n<data-([0-9a-f]+)>\n(.*?)\n</data-\1>", prompts[2],
                       re.DOTALL)
    assert fenced is not None and f"RuntimeError: {CRASH_MESSAGE}" in fenced.group(2)


def test_agent_calls_are_recorded_with_tokens_and_cost(crash_fix_session: CrashFixSession) -> None:
    """Every API call becomes an agent_calls row of the session with its tokens, priced cost and latency."""
    calls = crash_fix_session.calls
    assert len(calls) == len(crash_fix_session.requests) == 4
    for call in calls:
        assert (call["provider"], call["model"], call["outcome"]) == ("anthropic", "claude-sonnet-5-5", "ok")
        assert (call["input_tokens"], call["output_tokens"]) == (1000, 200)
        assert (call["cache_read_tokens"], call["cache_write_tokens"]) == (500, 100)
        assert call["cost_usd"] == pytest.approx(COST_PER_CALL)
        assert call["latency_s"] > 0
    headers = {name.lower(): value for name, value in crash_fix_session.requests[0].headers.items()}
    assert "sk-test" in headers.get("x-api-key", headers.get("authorization", ""))  # the SDK picks the header


def test_session_rides_out_an_agent_api_outage_and_records_the_failures(
        tmp_path: Path, baseline_source: str, postgres_url: str, prepared_data: Path,
        fake_api: FakeAnthropicServer) -> None:
    """529/500 answers exhaust one proposal's retries; the session asks again, goes on, and logs every failure."""
    outage = [error_reply(529, "overloaded"), error_reply(500, "internal"), error_reply(529, "overloaded"),
              error_reply(500, "internal")]
    fake_api.enqueue(*outage, LONGER_WARMUP, SOFTER_CAP)
    # Three attempts per proposal: the first proposal fails outright, the session retries it after a pause.
    settings = anthropic_settings(tmp_path, baseline_source, postgres_url, prepared_data, fake_api, training=ROOMY,
                                  max_retries=2)
    summary, rows = run_session(settings, candidates=1)

    assert summary.status == "completed"
    assert [(r.kind, r.status in ("kept", "discarded")) for r in rows] == [("baseline", True), ("candidate", True)]
    assert rows[1].description == "longer warm-up"
    calls = agent_calls(settings.database_url, summary.session_id)
    assert [c["outcome"] for c in calls] == ["error"] * 4 + ["ok"] * 2
    assert [c["error"].split(":")[0] for c in calls[:4]] == ["HTTP 529", "HTTP 500", "HTTP 529", "HTTP 500"]
    assert all(c["cost_usd"] == 0 for c in calls[:4])
    assert fake_api.pending == 0


def _prompt_text(request: RecordedRequest) -> str:
    return "\n".join(block["text"] for block in request.body["messages"][0]["content"])


def test_second_night_continues_the_first_nights_line_with_its_notebook(
        tmp_path: Path, baseline_source: str, postgres_url: str, prepared_data: Path,
        fake_api: FakeAnthropicServer) -> None:
    """Night 2 re-measures night 1's best as its baseline and shows the agent night 1's ledger and notebook."""
    from daemon.store import open_store

    notes = "NIGHT-1 NOTES: printing less often was neutral; try the logit cap next."
    fake_api.enqueue(proposal("print less often", "PRINT_EVERY_SECONDS = 2.0", "PRINT_EVERY_SECONDS = 2.5", notes),
                     proposal("softer cap (prefetched, never run)", "LOGIT_SOFTCAP = 15.0", "LOGIT_SOFTCAP = 20.0",
                              "NEVER-STORED: this proposal never became an experiment"))
    settings = anthropic_settings(tmp_path, baseline_source, postgres_url, prepared_data, fake_api, training=ROOMY)
    night1, rows1 = run_session(settings, candidates=1)
    fake_api.enqueue(SOFTER_CAP, SOFTER_CAP)
    night2, rows2 = run_session(settings, candidates=1)

    store = open_store(settings.database_url)
    try:
        line = store.line_of(night2.session_id)
        assert line is not None and store.line_sessions(line) == [night1.session_id, night2.session_id]
        best1 = store.best(night1.session_id)
        notebook = store.notebook(line)
    finally:
        store.close()
    assert best1 is not None and notebook is not None
    baseline2 = rows2[0]
    assert baseline2.kind == "baseline" and baseline2.source == best1.source
    assert baseline2.description == f"baseline (the line's best #{best1.id})"
    assert (notebook.text, notebook.author, notebook.experiment_id) == (notes, "agent", rows1[1].id)
    assert fake_api.rejections == []
    night2_prompt = _prompt_text(fake_api.requests[2])
    assert notes in night2_prompt and "NEVER-STORED" not in night2_prompt
    assert "The ledger in numbers (2 nights)" in night2_prompt
    assert re.search(rf"^{rows1[1].id} \| 1 \| candidate \| \w+ \| \d+ \| [0-9.]+ .*print less often", night2_prompt,
                     re.M)
    assert "# Environment" in fake_api.requests[2].body["system"][-1]["text"]


def test_crash_is_repaired_through_smoke_runs_without_a_full_run(
        tmp_path: Path, baseline_source: str, postgres_url: str, prepared_data: Path,
        fake_api: FakeAnthropicServer) -> None:
    """A candidate that crashes is caught by its smoke run, the agent repairs it, and only the fix runs in full."""
    from daemon.store import open_store

    fake_api.enqueue(CRASHING, FIXED, SOFTER_CAP, SOFTER_CAP)
    settings = anthropic_settings(tmp_path, baseline_source, postgres_url, prepared_data, fake_api,
                                  training={**ROOMY, "smoke": True})
    summary, rows = run_session(settings, candidates=1)

    assert summary.status == "completed"
    assert [(r.kind, r.description) for r in rows] == [("baseline", "baseline"),
                                                        ("candidate", "print less often (fixed)")]
    assert rows[1].status in ("kept", "discarded", "timeout"), (rows[1].error, rows[1].log_tail[-2000:])
    store = open_store(settings.database_url)
    try:
        smoke = store.smoke_runs(summary.session_id)
    finally:
        store.close()
    # On a loaded CPU the harness's budget clock may call the fix's few seconds a timeout: not a smoke failure.
    assert [(run.description, run.status, run.repair_round) for run in smoke[:2]] in (
        [("print less often (buggy)", "crashed", 0), ("print less often (fixed)", fixed, 1)]
        for fixed in ("passed", "timeout"))
    assert CRASH_MESSAGE in smoke[0].log_tail and all(run.seconds for run in smoke[:2])
    repair = _prompt_text(fake_api.requests[1])
    assert "failed its smoke run (`crashed`)" in repair
    fenced = re.search(r"The error and the last lines of its output:\n<data-([0-9a-f]+)>\n(.*?)\n</data-\1>", repair,
                       re.DOTALL)
    assert fenced is not None and f"RuntimeError: {CRASH_MESSAGE}" in fenced.group(2)
    assert fake_api.rejections == []
    for run in smoke:
        print(f"smoke run {run.id} ({run.status}): {run.seconds:.1f} s")  # the figure for the report
