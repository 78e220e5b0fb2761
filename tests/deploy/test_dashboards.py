"""Grafana provisioning and the "autoresearch / night" dashboard: structure, and every query run for real.

PromQL: a Prometheus process started here (deploy/prometheus/prometheus.yml with the test's target and a
1 s interval, alerts.yml loaded) scrapes the /metrics endpoint of a real daemon (`daemon.service.serve.Service`)
while it runs a short tiny CPU session (`metrics_endpoint`). SQL: the real schema (`Store.upgrade()`) filled
through the real Store API.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
import yaml

from daemon.research.workspace import Workspace
from daemon.service.runtime import open_runtime
from daemon.service.serve import Service
from daemon.store import AgentCallRecord, Store, open_store
from sandbox.gpu import GpuInfo
from tests.e2e.support import empty_database, free_port, tiny_settings
from tests.fakes.anthropic_server import FakeAnthropicServer, Reply, tool_reply

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO / "grafana" / "dashboards"
PROVISIONING = REPO / "grafana" / "provisioning"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
# Alerts of a healthy short session: their expressions must evaluate (rule health "ok") and be empty.
EXPECTED_EMPTY_ALERTS = {
    "AutoresearchDaemonDown", "AutoresearchDaemonAbsent",
    "AutoresearchSessionFailed", "AutoresearchConsecutiveCrashes", "AutoresearchGpuIdleInWindow",
    "AutoresearchDatabaseUnreachable", "AutoresearchDiskLow", "AutoresearchDiskAlmostFull",
    "AutoresearchAgentErrors", "AutoresearchGpuQuarantined", "AutoresearchCostCapReached",
    "AutoresearchNoImprovementTonight",
}
# ...and the one that always fires, on purpose (the alert path's heartbeat).
ALWAYS_FIRING_ALERTS = {"AutoresearchAlertingHeartbeat"}
# The session ends (SIGTERM) inside its 1 h window: "window open, nothing finishing" may hold by then, as it
# should (the window outlives its session); its `for:` keeps it from firing within the test.
ARMED_AFTER_THE_SESSION = {"AutoresearchNoExperimentFinished"}
# The session's repeats train on a shared test machine: when other work loads it, their step counts really do
# spread over 1.2x and the query holds, as it should; its `for:` keeps it from firing within the test.
LOAD_DEPENDENT_ALERTS = {"AutoresearchLoadSetsTheNoise"}
# Grafana's interval variables, given the values Grafana would pick for a short range; $instance = All.
GRAFANA_INTERVALS = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "10m", "$instance": ".*"}
GPU_UUID = "GPU-00000000-0000-0000-0000-00000000test"
SESSION_CANDIDATES = 1
# One distinct change per proposal (more than the session needs: the agent prepares ahead).
PROPOSALS = [("WARMUP_FRACTION", "0.02", "0.05"), ("LOGIT_SOFTCAP", "15.0", "20.0"), ("MUON_MOMENTUM", "0.95", "0.9"),
             ("WARMDOWN_FRACTION", "0.4", "0.5"), ("FINAL_LR_FRACTION", "0.0", "0.1")]


def _dashboards() -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))]


def _datasources() -> list[dict[str, Any]]:
    found = []
    for path in sorted((PROVISIONING / "datasources").glob("*.yaml")):
        found += yaml.safe_load(path.read_text())["datasources"]
    return found


def _targets(kind: str) -> list[tuple[str, str]]:
    """(panel title, query) of every target whose datasource type is `kind`, plus templating queries."""
    found = []
    for dashboard in _dashboards():
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                if target["datasource"]["type"] == kind:
                    found.append((panel["title"], target["expr"] if kind == "prometheus" else target["rawSql"]))
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query" and variable["datasource"]["type"] == kind:
                query = variable["query"]
                text = query["query"] if isinstance(query, dict) else query
                # Grafana's label_values(metric, label): the PromQL that finds the same values
                text = re.sub(r"^label_values\((\w+), (\w+)\)$", r"count by (\2) (\1)", text)
                found.append((f"variable {variable['name']}", text))
    return found


def _variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard["templating"]["list"]}


# --- structure ---------------------------------------------------------------------------------------


def test_night_dashboard_exists_with_its_title() -> None:
    """grafana/dashboards/night.json is the dashboard "autoresearch / night"."""
    night = json.loads((DASHBOARD_DIR / "night.json").read_text())
    assert night["title"] == "autoresearch / night" and night["uid"] == "autoresearch-night"


def test_dashboard_and_panel_ids_are_unique() -> None:
    """Dashboard uids are unique across files, panel ids unique within a dashboard."""
    dashboards = _dashboards()
    uids = [d["uid"] for d in dashboards]
    assert len(uids) == len(set(uids))
    for dashboard in dashboards:
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), dashboard["uid"]


def test_every_datasource_reference_is_a_datasource_variable_of_a_provisioned_type() -> None:
    """Panels, targets and query variables pick their datasource through $datasource / $pg, whose type a
    provisioned datasource has (so a lab's own Prometheus can be chosen instead)."""
    provisioned_types = {d["type"] for d in _datasources()}
    for dashboard in _dashboards():
        variables = _variables(dashboard)
        refs = [v["datasource"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
        for panel in dashboard["panels"]:
            refs.append(panel["datasource"])
            refs += [t["datasource"] for t in panel["targets"]]
        for ref in refs:
            match = re.fullmatch(r"\$\{(\w+)\}", ref["uid"])
            assert match, f"a fixed datasource uid: {ref}"
            variable = variables[match.group(1)]
            assert variable["type"] == "datasource" and variable["query"] == ref["type"], ref
            assert ref["type"] in provisioned_types, ref


def test_provisioned_datasource_uids_are_unique_and_none_is_default() -> None:
    """Datasource uids do not collide and none claims the default (Grafana refuses two defaults)."""
    sources = _datasources()
    assert len({d["uid"] for d in sources}) == len(sources)
    assert all(d.get("isDefault") is False for d in sources)


def test_every_promql_metric_is_filtered_by_the_instance_variable() -> None:
    """Each metric selector of every PromQL query carries instance=~"$instance" (several daemons, one Prometheus)."""
    for title, expr in _targets("prometheus"):
        if title.startswith("variable "):
            continue
        names = re.findall(r"autoresearch_[a-z_]+", expr)
        assert names, title
        assert len(re.findall(r'autoresearch_[a-z_]+\{instance=~"\$instance"', expr)) == len(names), (title, expr)
    instance = _variables(_dashboards()[0])["instance"]
    assert instance["includeAll"] and instance["allValue"] == ".*" and instance["multi"]


def test_every_panel_has_a_unit() -> None:
    """Every panel states its unit; the experiment table states one on its val_bpb and delta columns."""
    for dashboard in _dashboards():
        for panel in dashboard["panels"]:
            unit = panel["fieldConfig"]["defaults"].get("unit")
            assert unit, panel["title"]
            if panel["type"] == "table":
                columns = {o["matcher"]["options"]: {p["id"]: p["value"] for p in o["properties"]}
                           for o in panel["fieldConfig"]["overrides"]}
                assert columns["val_bpb"]["unit"] == columns["delta"]["unit"] == "suffix: bpb"


def test_dashboard_provider_points_at_the_mounted_folder() -> None:
    """The file provider loads the folder that compose.yaml mounts grafana/dashboards into."""
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "autoresearch.yaml").read_text())["providers"][0]
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"../grafana/dashboards:{provider['options']['path']}:ro" in mounts


def test_dashboard_covers_the_night() -> None:
    """The panels the night needs are there, with a Postgres table of the session's experiments."""
    titles = {p["title"] for p in json.loads((DASHBOARD_DIR / "night.json").read_text())["panels"]}
    for title in ("Best val_bpb over time", "val_bpb per experiment (kept vs discarded)", "Experiments by status",
                  "GPU lanes busy", "Lane duty cycle", "Window state", "Agent tokens per hour", "Agent cost",
                  "Crash streak", "Experiments of the session"):
        assert title in titles, title


# --- PromQL against a real Prometheus ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


class _OneIdleGpu:
    """The NVML seam: one idle GPU with no foreign process (on a CPU machine the lane trains on the CPU)."""

    def gpus(self) -> list[GpuInfo]:
        return [GpuInfo(GPU_UUID, 0, "Scripted GPU", memory_used_mb=0.0, memory_total_mb=80_000.0, utilization=0.0)]

    def gpu_pids(self, uuid: str) -> list[int]:
        return []


def _proposal(constant: str, old: str, new: str) -> Reply:
    return tool_reply({"description": f"{constant} {old} -> {new}", "hypothesis": "may lower val_bpb",
                       "edits": [{"search": f"{constant} = {old}", "replace": f"{constant} = {new}"}]},
                      usage={"input_tokens": 9000, "output_tokens": 1500, "cache_read_input_tokens": 6000,
                             "cache_creation_input_tokens": 800})


@pytest.fixture(scope="module")
def metrics_endpoint(tmp_path_factory: pytest.TempPathFactory, postgres_url: str, prepared_data: Path,
                     baseline_source: str) -> Iterator[tuple[str, Callable[[], None]]]:
    """(host:port of a real daemon's /metrics endpoint, a function that runs a short session on it).

    The daemon is the real `Service` (scheduler, window open now, one lane on a scripted GPU, real tiny CPU
    training in the local sandbox, real Postgres), its agent the real Anthropic SDK against the fake API.
    The session function waits for the first candidate to start, sends SIGTERM (finish, then stop) and
    returns once the daemon has stopped; the endpoint stays up for Prometheus until the module ends.
    """
    with FakeAnthropicServer() as api:
        api.enqueue(*[_proposal(*change) for change in PROPOSALS])
        workspace = Workspace.init(tmp_path_factory.mktemp("daemon") / "ws", baseline_source=baseline_source)
        settings = tiny_settings(
            workspace.root, empty_database(postgres_url), prepared_data,
            metrics={"port": free_port()},
            judge={"noise_runs": 1},  # the noise gauge is absent until measured: measure it
            agent={"provider": "anthropic", "api_key": "sk-test", "base_url": api.url, "retry_backoff_s": 0.01},
            scheduler={"windows": [{"cron": "* * * * *", "hours": 1.0, "name": "test"}]})
        runtime = open_runtime(settings, daemon=True, probe=_OneIdleGpu())
        runtime.runner.require_cuda = False  # a scripted GPU on a CPU machine: its lane's stages run on the CPU
        service = Service(runtime)

        def run_session() -> None:
            daemon = threading.Thread(target=service.serve, name="daemon", daemon=True)
            daemon.start()
            deadline = time.monotonic() + 240
            while len(runtime.store.list_experiments(kind="candidate", limit=10)) < SESSION_CANDIDATES:
                assert daemon.is_alive() and time.monotonic() < deadline, "the daemon did not reach its candidates"
                time.sleep(0.5)
            service.on_signal(signal.SIGTERM, None)
            daemon.join(timeout=120)
            assert not daemon.is_alive(), "the daemon did not stop after SIGTERM"

        try:
            assert runtime.server is not None
            yield f"127.0.0.1:{runtime.server.port}", run_session
        finally:
            service.shutdown.set()
            runtime.close()


@pytest.fixture(scope="module")
def live_prometheus(
    metrics_endpoint: tuple[str, Callable[[], None]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Base URL of a real Prometheus that scraped a whole short session every second, alerts.yml loaded."""
    if shutil.which("prometheus") is None:
        pytest.skip("no prometheus binary: apt-get install prometheus")
    target, run_session = metrics_endpoint
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log_path = work / "prometheus.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            ["prometheus", f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=log,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until(lambda: _query(base, 'up{job="autoresearch"} == 1'), "scraping the daemon", process, log_path)
        run_session()
        # Two more scrapes and rule evaluations after the session's last change.
        time.sleep(2.5)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def _wait_until(probe: Callable[[], object], what: str, process: subprocess.Popen[bytes], log_path: Path,
                limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        if process.poll() is not None:
            raise AssertionError(f"prometheus exited: {log_path.read_text()[-2000:]}")
        try:
            if probe():
                return
        except OSError:  # not listening yet
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"prometheus not {what} after {limit_s} s: {log_path.read_text()[-2000:]}")
        time.sleep(0.3)


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        reply = _get_json(url)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"Prometheus rejected {expr!r}: {exc.read().decode()}") from None
    assert reply["status"] == "success", reply
    return list(reply["data"]["result"])


def _expand_grafana_intervals(expr: str) -> str:
    for variable, value in GRAFANA_INTERVALS.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unexpanded Grafana variable in {expr!r}"
    return expr


@pytest.mark.prometheus
@pytest.mark.postgres
@pytest.mark.slow
def test_every_promql_query_returns_data(live_prometheus: str) -> None:
    """Each Prometheus query of the dashboards returns at least one series from the scraped session."""
    queries = _targets("prometheus")
    assert queries
    empty = [(title, expr) for title, expr in queries if not _query(live_prometheus, _expand_grafana_intervals(expr))]
    assert empty == []


@pytest.mark.prometheus
@pytest.mark.postgres
@pytest.mark.slow
def test_every_alert_rule_evaluates_and_healthy_session_fires_none(live_prometheus: str) -> None:
    """Prometheus evaluates every alert rule without error; on a healthy session each is expected-empty."""
    rules = [rule for group in _get_json(f"{live_prometheus}/api/v1/rules")["data"]["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == (EXPECTED_EMPTY_ALERTS | ALWAYS_FIRING_ALERTS | ARMED_AFTER_THE_SESSION
                                                | LOAD_DEPENDENT_ALERTS)
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        if rule["name"] in EXPECTED_EMPTY_ALERTS:
            assert _query(live_prometheus, rule["query"]) == [], rule["name"]
        elif rule["name"] in ALWAYS_FIRING_ALERTS:
            assert _query(live_prometheus, rule["query"]), rule["name"]
        else:
            assert rule["state"] != "firing", rule["name"]
    assert _query(live_prometheus, 'up{job="autoresearch"} == 1')


# --- SQL against the real Postgres schema --------------------------------------------------------------


def _run_experiment(store: Store, session_id: int, kind: str, status: str, val_bpb: float | None,
                    parent_id: int | None, description: str) -> int:
    created = store.create_experiment(session_id, kind, f"# train.py for {description}\n", parent_id=parent_id,
                                      description=description)
    claimed = store.claim_next(session_id, owner="test-owner", lane="gpu0", gpu_uuid="GPU-test-0", lease_seconds=600)
    assert claimed is not None and claimed.id == created.id
    if status == "crashed":
        store.transition(created.id, "running", "crashed", exit_code=1, error="RuntimeError: boom")
    else:
        store.transition(created.id, "running", "evaluating")
        store.transition(created.id, "evaluating", status, val_bpb=val_bpb)
    return created.id


@pytest.fixture(scope="module")
def filled_session(postgres_url: str) -> Iterator[tuple[str, int]]:
    """(database URL, session id) of a short session written through the real Store on the migrated schema."""
    store = open_store(postgres_url, retry_seconds=5)
    try:
        store.upgrade()
        session = store.create_session("night-test", "window", "# program\n", {"budget": 5})
        baseline = _run_experiment(store, session.id, "baseline", "kept", 1.2031, None, "baseline")
        _run_experiment(store, session.id, "candidate", "discarded", 1.2055, baseline, "lr 0.04 -> 0.05")
        better = _run_experiment(store, session.id, "candidate", "kept", 1.1987, baseline, "depth 4 -> 6")
        _run_experiment(store, session.id, "candidate", "crashed", None, better, "fused attention")
        store.record_agent_call(AgentCallRecord(provider="anthropic", model="claude-sonnet-5-5", input_tokens=9000,
                                                output_tokens=1500, cost_usd=0.07, latency_s=12.0,
                                                session_id=session.id))
        yield postgres_url, session.id
    finally:
        store.close()


def _expand_grafana_sql(sql: str, session_id: int | str) -> str:
    """Grafana's Postgres macros and the dashboard variable, as Grafana expands them."""
    now = datetime.now(timezone.utc)
    # Grafana writes whole seconds; round the end up so rows of this very second are inside the range.
    start, end = (now - timedelta(hours=12), now + timedelta(seconds=1))
    start, end = start.strftime("%Y-%m-%dT%H:%M:%SZ"), end.strftime("%Y-%m-%dT%H:%M:%SZ")
    sql = re.sub(r"\$__timeFilter\(([^)]+)\)", rf"\1 BETWEEN '{start}' AND '{end}'", sql)
    sql = sql.replace("${session:sqlstring}", _grafana_sqlstring(str(session_id)))
    assert not GRAFANA_VARIABLE.search(sql), f"unexpanded Grafana macro in {sql!r}"
    return sql


# Grafana's variable syntaxes: $name, ${name}, ${name:format}, [[name]] (a `$` in an SQL regex is none of them).
GRAFANA_VARIABLE = re.compile(r"\$\w|\$\{|\[\[\w")


def _grafana_sqlstring(value: str) -> str:
    """Grafana's `sqlstring` format: the value in single quotes, each quote inside doubled."""
    return "'" + value.replace("'", "''") + "'"


def _run_sql(url: str, sql: str) -> list[dict[str, Any]]:
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(row._mapping) for row in conn.exec_driver_sql(sql)]
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_every_sql_query_runs_on_the_real_schema_and_returns_rows(filled_session: tuple[str, int]) -> None:
    """Each Postgres query of the dashboards (panels and variables) runs and returns rows for the session."""
    url, session_id = filled_session
    queries = _targets("grafana-postgresql-datasource")
    assert queries
    for title, sql in queries:
        assert _run_sql(url, _expand_grafana_sql(sql, session_id)), title


@pytest.mark.postgres
def test_every_sql_query_is_safe_before_the_first_session() -> None:
    """On a migrated database with no session (and an empty $session), every query runs and returns nothing."""
    from tests.conftest import scratch_database

    with scratch_database("autoresearch_dash_empty") as url:
        store = open_store(url, retry_seconds=5)
        store.upgrade()
        store.close()
        for title, sql in _targets("grafana-postgresql-datasource"):
            assert _run_sql(url, _expand_grafana_sql(sql, "")) == [], title


@pytest.mark.postgres
def test_empty_session_variable_shows_the_latest_session(filled_session: tuple[str, int]) -> None:
    """With $session not chosen yet, the experiment table shows the latest session's experiments."""
    url, session_id = filled_session
    sql = dict(_targets("grafana-postgresql-datasource"))["Experiments of the session"]
    assert _run_sql(url, _expand_grafana_sql(sql, "")) == _run_sql(url, _expand_grafana_sql(sql, session_id))


@pytest.mark.postgres
def test_experiment_table_shows_every_experiment_with_its_delta(filled_session: tuple[str, int]) -> None:
    """The session table lists all experiments, newest first, with val_bpb minus its parent's val_bpb."""
    url, session_id = filled_session
    sql = dict(_targets("grafana-postgresql-datasource"))["Experiments of the session"]
    rows = _run_sql(url, _expand_grafana_sql(sql, session_id))
    assert [r["status"] for r in rows] == ["crashed", "kept", "discarded", "kept"]
    assert [r["description"] for r in rows][1] == "depth 4 -> 6"
    assert rows[1]["delta"] == pytest.approx(1.1987 - 1.2031)
    assert rows[2]["delta"] == pytest.approx(1.2055 - 1.2031)
    assert rows[0]["delta"] is None and rows[3]["delta"] is None
    assert {r["lane"] for r in rows} == {"gpu0"} and all(r["time"] is not None for r in rows)


@pytest.mark.postgres
def test_val_bpb_series_has_only_kept_and_discarded_points(filled_session: tuple[str, int]) -> None:
    """The kept-vs-discarded chart gets one point per evaluated candidate, labelled by status."""
    url, session_id = filled_session
    sql = dict(_targets("grafana-postgresql-datasource"))["val_bpb per experiment (kept vs discarded)"]
    rows = _run_sql(url, _expand_grafana_sql(sql, session_id))
    assert sorted((r["metric"], r["value"]) for r in rows) == [
        ("discarded", 1.2055), ("kept", 1.1987), ("kept", 1.2031)]


def test_every_sql_variable_is_quoted_by_grafana() -> None:
    """Each variable in a Postgres query uses the sqlstring format; none is pasted into SQL as it is."""
    queries = _targets("grafana-postgresql-datasource")
    for title, sql in queries:
        for use in re.findall(r"\$\{?\w+(?::\w+)?\}?|\[\[\w+\]\]", sql):
            assert use.startswith("$__") or re.fullmatch(r"\$\{\w+:sqlstring\}", use), (title, use)


# The class of SQL injection through a URL's var-session=: quote breakouts, stacked statements, comments,
# backslashes (standard_conforming_strings), dollar quoting, look-alike quotes, NUL-free control characters,
# numbers out of range, and values that are numbers only in part.
HOSTILE_SESSIONS = [
    "1' OR '1'='1", "0'; DROP TABLE experiments; --", "1'||(SELECT string_agg(tag, ',') FROM sessions)||'",
    "1\\'; DELETE FROM sessions; --", "$$; DELETE FROM sessions; $$", "1/* comment */", "1 -- comment",
    "1\u02bc OR 1=1", "1\n; UPDATE experiments SET val_bpb = 0; --", "'", "''", "\\", "99999999999999999999",
    "-1", " 1", "1e3", "0x10", "1; SELECT pg_sleep(30)", "ğ", "1 UNION SELECT NULL",
]


@pytest.fixture()
def grafana_reader(filled_session: tuple[str, int]) -> Iterator[str]:
    """The database URL of a role set up like the compose stack's grafana_reader (its ALTER ROLE lines, SELECT)."""
    import uuid

    url, _ = filled_session
    role = f"grafana_reader_{uuid.uuid4().hex[:8]}"
    settings = _reader_role_settings(REPO / "deploy" / "compose.yaml")
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        for line in settings:
            conn.exec_driver_sql(line.replace("grafana_reader", role))
        conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA public TO {role}")
        conn.exec_driver_sql(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    try:
        yield str(sqlalchemy.engine.make_url(url).set(username=role, password=None).render_as_string(False))
    finally:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")
        engine.dispose()


def _reader_role_settings(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip().startswith("ALTER ROLE grafana_reader SET")]


def test_reader_role_has_a_statement_timeout_in_compose_and_the_readme() -> None:
    """The compose stack's and the host install's grafana_reader get the same settings, a statement timeout among them."""
    compose = _reader_role_settings(REPO / "deploy" / "compose.yaml")
    assert any("statement_timeout" in line for line in compose)
    assert compose == _reader_role_settings(REPO / "deploy" / "README.md")


@pytest.mark.postgres
def test_reader_role_times_out_and_cannot_write(grafana_reader: str) -> None:
    """Connected as the reader role: statement_timeout is set, and a write is refused (read-only transactions)."""
    engine = sqlalchemy.create_engine(grafana_reader)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "30s"
            assert conn.exec_driver_sql("SHOW default_transaction_read_only").scalar() == "on"
            with pytest.raises(sqlalchemy.exc.DBAPIError, match=r"read-only transaction"):
                conn.exec_driver_sql("DELETE FROM sessions")
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("value", HOSTILE_SESSIONS)
def test_hostile_session_values_stay_strings_and_show_the_latest_session(
        filled_session: tuple[str, int], grafana_reader: str, value: str) -> None:
    """A crafted $session runs no SQL of its own: each query returns exactly what an empty $session returns
    (the latest session), as Grafana's read-only role, and the tables are unchanged afterwards."""
    url, _ = filled_session
    counts = "SELECT (SELECT count(*) FROM sessions) AS s, (SELECT count(*) FROM experiments) AS e"
    before = _run_sql(url, counts)
    for title, sql in _targets("grafana-postgresql-datasource"):
        if "${session:sqlstring}" not in sql:
            continue
        assert _run_sql(grafana_reader, _expand_grafana_sql(sql, value)) == \
            _run_sql(grafana_reader, _expand_grafana_sql(sql, "")), (title, value)
    assert _run_sql(url, counts) == before


@pytest.mark.prometheus
@pytest.mark.postgres
@pytest.mark.slow
def test_real_daemon_exports_what_the_failing_night_alerts_need(live_prometheus: str) -> None:
    """After the real daemon's session ended inside its window: window_active 0 but window_open 1, the session
    counted by status, the database up, lanes idle, free disk of the workspace: all scraped by Prometheus."""
    for expr in ("autoresearch_window_active == 0", "autoresearch_window_open == 1",
                 "sum(autoresearch_sessions_ended_total) == 1", "autoresearch_db_up == 1",
                 "autoresearch_lane_idle_seconds > 0", 'autoresearch_disk_free_bytes{use="workspace"} > 0',
                 'autoresearch_disk_size_bytes{use="runs"} > 0'):
        assert _query(live_prometheus, expr), expr
