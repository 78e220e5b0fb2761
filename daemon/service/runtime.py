"""The long-lived parts of a daemon process, built from settings: store, sandbox, runner, agent, metrics.

`open_runtime` also runs start-up reconciliation, so every command that executes experiments
(`run`, `once`, `try`) starts from a database and a sandbox that agree.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.agents import Agent, SystemClock, make_agent
from daemon.config import Settings
from daemon.errors import AutoresearchError, ConfigError
from daemon.ops.health_metrics import DatabasePinger, local_docker_root
from daemon.ops.http import DaemonHTTPServer, Heartbeat, start_http_server
from daemon.ops.logs import get_logger
from daemon.ops.metrics import Metrics
from daemon.ops.statusdata import DaemonFacts, LaneInfo, status_data
from daemon.ops.statuspage import LiveState, render_status_page
from daemon.research.cost_model import NightPlan, plan_night
from daemon.research.lanes import Lane, cluster_lanes, plan_lanes
from daemon.research.replay import ScoredRunStore, StoredReplayGuard
from daemon.research.runner import StageRunner
from daemon.research.workspace import Workspace
from daemon.service.cluster import record_jobs, require_node_paths, slurm_options
from daemon.service.lock import DaemonLock
from daemon.service.reconcile import Reconciled, reconcile
from daemon.store.backup import backup_if_behind
from daemon.store.records import AgentCallRecord
from sandbox import docker_available, open_backend
from sandbox.base import Backend
from sandbox.errors import BackendUnavailable
from sandbox.gpu import GpuProbe, NoGpuProbe
from sandbox.labels import owner_id
from sandbox.spec import Limits
from trainer.device_check import REQUIRE_ENV
from trainer.probe_power import FLOOR_ENV

log = get_logger("autoresearch.runtime")
TRAINER_DIR = Path(__file__).resolve().parents[2] / "trainer"
LOCAL_WARNING = (
    "WARNING: no Docker engine with the trainer image: running candidates with the LOCAL backend "
    "(no mount namespace, weaker isolation). Fine for a demo on your laptop, never on a shared server."
)


class MeteredCallSink:
    """The store as the agents' call sink, also feeding the agent metrics and tonight's cost gauge."""

    def __init__(self, store: Any, metrics: Metrics, cost_since: datetime, cap_usd: float) -> None:
        self.store, self.metrics, self.since, self.cap_usd = store, metrics, cost_since, cap_usd

    def record_agent_call(self, record: AgentCallRecord) -> object:
        stored = self.store.record_agent_call(record)
        self.metrics.agent_call(record.provider, record.model, record.outcome, input_tokens=record.input_tokens,
                                output_tokens=record.output_tokens, cache_read_tokens=record.cache_read_tokens,
                                cache_write_tokens=record.cache_write_tokens, cost_usd=record.cost_usd,
                                latency_s=record.latency_s)
        self.metrics.cost(self.store.cost_since(self.since), self.cap_usd)
        return stored

    def cost_since(self, since: datetime) -> float:
        # The agent checks the cap against the current window's start before every call: the gauge
        # ("cost tonight") follows that same start instead of the process start.
        self.since = since
        return float(self.store.cost_since(since))


@dataclass
class Runtime:
    settings: Settings
    workspace: Workspace
    store: Any
    backend: Backend
    runner: StageRunner
    agent: Agent
    lanes: list[Lane]
    probe: GpuProbe
    metrics: Metrics
    heartbeat: Heartbeat
    owner: str
    reconciled: Reconciled
    live: LiveState = field(default_factory=LiveState)
    server: DaemonHTTPServer | None = None
    cost_since: datetime = field(default_factory=lambda: SystemClock().now())
    lock: DaemonLock | None = None
    db_pinger: DatabasePinger | None = None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.db_pinger is not None:
            self.db_pinger.stop()
        close = getattr(self.store, "close", None)
        if close is not None:
            close()
        if self.lock is not None:
            self.lock.release()


def choose_backend(settings: Settings, *, daemon: bool) -> Backend:
    """The configured sandbox; `auto` falls back to local loudly, except for the daemon, which refuses."""
    kind = settings.sandbox.backend
    instance = settings.instance_name
    if kind == "auto" and daemon and not docker_available():
        raise ConfigError("the daemon will not run candidates without Docker isolation (no engine answers)",
                          hint="start Docker (`make services`), or set [sandbox] backend = 'local' explicitly "
                               "on a single-user development machine")
    try:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backend = open_backend(kind, settings.sandbox.image, instance,
                                   slurm=slurm_options(settings) if kind == "slurm" else None)
    except BackendUnavailable as exc:
        raise AutoresearchError(str(exc), hint="see `autoresearch doctor`") from None
    if backend.name == "local" and importlib.util.find_spec("torch") is None:
        raise ConfigError("the local backend trains on this host, and torch is not installed here",
                          hint="pip install 'autoresearch-daemon[local]' (development only), or use the docker "
                               "backend: the trainer image holds torch, the host needs none")
    if backend.name == "local" and kind == "auto":
        if daemon:
            raise ConfigError(
                f"the daemon will not fall back to the local backend ({'; '.join(str(w.message) for w in caught)})",
                hint="build the image (`autoresearch image build`), or set [sandbox] backend = 'local' explicitly")
        print(LOCAL_WARNING, file=sys.stderr)
    return backend


def default_probe() -> GpuProbe:
    try:
        from sandbox.gpu import NvmlProbe

        return NvmlProbe()
    except Exception:  # no driver / no NVML library: a CPU machine
        return NoGpuProbe()


def gpu_indexes(probe: GpuProbe) -> dict[str, int]:
    """GPU UUID -> NVML index, for the lane info metric and `status` (empty when the probe fails)."""
    try:
        return {info.uuid: info.index for info in probe.gpus()}
    except Exception:  # NVML hiccup: the lanes still run, only the index is unknown
        return {}


def night_plan(settings: Settings, probe: GpuProbe | None, backend: str = "") -> NightPlan:
    """The night's eval size, eval timeout and train projection on this machine (daemon.research.cost_model)."""
    gpu_names = [info.name for info in probe.gpus()] if backend != "slurm" and probe is not None else []
    cpus = float(settings.slurm.cpus_per_job) if backend == "slurm" else min(
        settings.sandbox.cpus or float(os.cpu_count() or 1), float(os.cpu_count() or 1))
    return plan_night(settings, gpu_names, cpus)


def check_capacity(plan: NightPlan) -> None:
    """Refuse (ConfigError, exit 2: systemd does not restart into it) a night that cannot finish in its limits."""
    for line in plan.lines():
        log.info("capacity", plan=line)
    if plan.problems:
        raise ConfigError("this configuration cannot finish inside its limits: "
                          + "; ".join(problem for problem, _fix in plan.problems),
                          hint="; ".join(fix for _problem, fix in plan.problems))


def sandbox_env(settings: Settings, plan: NightPlan) -> dict[str, str]:
    """The stages' environment: budget, compile allowance, preset, the eval size the plan picked, and whether
    the eval stage must refuse an eval below the probe floor (trainer.probe_power)."""
    return {
        "AUTORESEARCH_TIME_BUDGET": str(settings.training.time_budget_s),
        "AUTORESEARCH_COMPILE_BUDGET": str(settings.training.compile_budget_s),
        "AUTORESEARCH_PRESET": settings.training.preset,
        "AUTORESEARCH_EVAL_TOKENS": str(plan.eval.tokens),
        FLOOR_ENV: "1" if settings.training.probe_floor else "0",
        # Slurm GPU jobs get their GPU from the GRES, not from a lane's UUID: they require CUDA too.
        REQUIRE_ENV: "1" if settings.sandbox.backend == "slurm" and "gpu" in settings.slurm.gres else "0",
    }


def make_runner(settings: Settings, backend: Backend, workspace: Workspace, probe: GpuProbe,
                store: ScoredRunStore | None = None) -> StageRunner:
    """The stage runner; with `store`, its replay guard remembers scored runs there (across restarts).
    Raises ConfigError when the night cannot finish inside its limits (check_capacity)."""
    sandbox, training = settings.sandbox, settings.training
    plan = night_plan(settings, probe, settings.sandbox.backend)
    check_capacity(plan)
    host_cpus = float(os.cpu_count() or 1)  # Docker refuses a quota above the host's CPU count
    cpus = min(sandbox.cpus or host_cpus, host_cpus)
    if sandbox.backend == "slurm":  # the node's CPUs, as many as each job asks Slurm for
        cpus = float(settings.slurm.cpus_per_job)
    common = dict(memory_bytes=int(sandbox.memory_gb * 1024**3), cpus=cpus, pids=sandbox.pids,
                  shm_bytes=int(sandbox.shm_gb * 1024**3), tmpfs_bytes=int(sandbox.tmpfs_gb * 1024**3))
    train_limits = Limits(timeout_s=training.time_budget_s + training.compile_budget_s + training.startup_grace_s,
                          **common)  # type: ignore[arg-type]
    eval_limits = Limits(timeout_s=plan.eval_timeout_s, **common)  # type: ignore[arg-type]
    return StageRunner(backend, image=sandbox.image, trainer_dir=TRAINER_DIR, data_dir=settings.data_dir,
                       work_dir=workspace.runs_dir, instance=settings.instance_name, train_limits=train_limits,
                       eval_limits=eval_limits, env=sandbox_env(settings, plan), gpu_probe=probe,
                       gpu_release_timeout_s=sandbox.gpu_release_timeout_s,
                       compile_cache=workspace.root / "compile-cache",
                       replays=StoredReplayGuard(store) if store is not None else None)


def open_runtime(settings: Settings, *, daemon: bool, probe: GpuProbe | None = None, serve_http: bool = True,
                 agent: Agent | None = None) -> Runtime:
    from daemon.store import open_store

    workspace = Workspace.open(settings.workspace)
    owner = owner_id(settings.instance_name)
    # One daemon per database and instance: a second `run`/`once`/`try` refuses here, before touching anything.
    lock = DaemonLock(settings.database_url, settings.instance_name)
    lock.acquire(owner)
    try:
        store = open_store(settings.database_url, retry_seconds=settings.database.retry_seconds,
                           pool_size=settings.database.pool_size)
    except BaseException:
        lock.release()
        raise
    try:
        backend = choose_backend(settings, daemon=daemon)
        if settings.database.backup_before_upgrade:  # a schema behind the code: back it up before migrating
            backup = backup_if_behind(settings.database_url, workspace.root / "backups")
            if backup is not None:
                log.info("database backed up before its migration", backup=str(backup))
        reconciled = reconcile(store, backend, settings.instance_name, owner_alive=lock.owner_alive)
        probe = probe if probe is not None else default_probe()
        if backend.name == "slurm":  # lanes are concurrent jobs; the daemon's own machine has no GPU to count
            require_node_paths(backend, [workspace.runs_dir, settings.data_dir, TRAINER_DIR])
            record_jobs(backend, store)
            lanes = cluster_lanes(settings.slurm.max_jobs)
        else:
            lanes = plan_lanes(settings.gpus, probe)
        runner = make_runner(settings, backend, workspace, probe, store)
    except BaseException:
        store.close()  # e.g. data not prepared yet: the command fails, its connections must not linger
        lock.release()
        raise
    metrics = Metrics(training_budget_s=settings.training.time_budget_s,
                      cost_cap_usd=settings.agent.nightly_cost_cap_usd)
    clock = SystemClock()
    since = clock.now()
    sink = MeteredCallSink(store, metrics, since, settings.agent.nightly_cost_cap_usd)
    agent = agent if agent is not None else make_agent(settings, sink, clock)
    heartbeat = Heartbeat(max_age_s=max(60.0, settings.training.time_budget_s))
    live = LiveState()
    runtime = Runtime(settings, workspace, store, backend, runner, agent, lanes, probe, metrics, heartbeat,
                      owner, reconciled, live, cost_since=since, lock=lock)
    from daemon import __version__

    indexes = gpu_indexes(probe)
    for lane in lanes:
        metrics.lane_info(lane.name, lane.gpu_uuid, indexes.get(lane.gpu_uuid or ""))
    facts = DaemonFacts(instance=settings.instance_name, owner=owner, version=__version__,
                        lanes=[LaneInfo(lane.name, lane.gpu_uuid, indexes.get(lane.gpu_uuid or "")) for lane in lanes],
                        cost=lambda: (float(store.cost_since(sink.since)), sink.since),
                        cost_cap_usd=settings.agent.nightly_cost_cap_usd)
    if serve_http and settings.metrics.port != 0:
        runtime.server = start_http_server(settings.metrics.host, settings.metrics.port, metrics.registry,
                                           db_ping=store.ping, heartbeat=heartbeat,
                                           status_page=lambda: render_status_page(store, live),
                                           status_json=lambda: status_data(store, live, facts),
                                           web_config=settings.metrics.web_config_file)
        log.info("metrics endpoint", url=runtime.server.url)
        # For the alerts on a failing night: disk where runs, images and the database live; the database's pulse.
        metrics.watch_disks({"workspace": workspace.root, "runs": workspace.runs_dir, "data": settings.data_dir,
                             "images": local_docker_root() if backend.name == "docker" else None,
                             "database": settings.metrics.database_dir})
        runtime.db_pinger = DatabasePinger(store.ping, metrics.database_up, interval_s=15.0)
    return runtime
