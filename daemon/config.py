"""Configuration: a TOML file plus `AUTORESEARCH_*` environment overrides, validated loudly.

Precedence (highest first): explicit init values, environment (`AUTORESEARCH_AGENT__MODEL=...`, nested
keys joined by `__`), the TOML file (default `./autoresearch.toml`), built-in defaults. Secrets may
come from a file: `AUTORESEARCH_AGENT__API_KEY_FILE=/run/credentials/...` (systemd credentials,
Docker secrets). Defaults run on a laptop with nothing installed: SQLite in the workspace, the
offline agent when no API key is set, the CPU preset without a GPU, Docker when an engine answers.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from daemon.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("autoresearch.toml")
SYSTEM_CONFIG_PATH = Path("/etc/autoresearch/autoresearch.toml")  # a system install's (deploy/install.sh)
ENV_PREFIX = "AUTORESEARCH_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _read_secret_file(path: Path, key: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"{key} {str(path)!r} cannot be read: {exc.strerror}") from None
    if not value:
        raise ValueError(f"{key} {str(path)!r} is empty")
    return value


class DatabaseConfig(_Section):
    """The database. The URL and its password are secrets: `url_file` / `password_file` (systemd credentials,
    Docker secrets) keep them out of the environment, and neither is ever stored or logged (`public_url`)."""

    url: str = Field("", description="SQLAlchemy URL; empty = SQLite file in the workspace", repr=False)
    url_file: Path | None = Field(None, description="a file holding the URL (instead of url)")
    password_file: Path | None = Field(None, description="a file holding the password, put into the URL")
    pool_size: int = Field(5, ge=1, le=100)
    retry_seconds: float = Field(120.0, ge=0, description="how long transient DB errors are retried")
    backup_before_upgrade: bool = Field(True, description="back the database up (SQLite copy, pg_dump) into "
                                        "<workspace>/backups before the daemon or `db upgrade` migrates it")

    @model_validator(mode="after")
    def _read_secret_files(self) -> DatabaseConfig:
        url = self.url
        if self.url_file is not None:
            if url:
                raise ValueError("set database.url or database.url_file, not both")
            url = _read_secret_file(self.url_file, "database.url_file")
        if self.password_file is not None:
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError

            if not url:
                raise ValueError("database.password_file needs database.url (the URL without its password)")
            try:
                parsed = make_url(url)
            except ArgumentError:
                raise ValueError("database.url is not a database URL") from None
            if parsed.password:
                raise ValueError("database.url already has a password: drop it or drop database.password_file")
            url = parsed.set(password=_read_secret_file(self.password_file, "database.password_file")).render_as_string(
                hide_password=False)
        object.__setattr__(self, "url", url)
        return self

    @property
    def public_url(self) -> str:
        """The URL with its password masked: what may be logged, shown or stored."""
        return public_url(self.url)


def public_url(url: str) -> str:
    """`url` with any password replaced by ***, safe to log or store (unparseable input is hidden whole)."""
    if not url:
        return ""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unparseable database URL hidden)"


class DataConfig(_Section):
    source: str = Field("stdlib", description="'stdlib', a local file/folder, or parquet shard URLs (comma separated)")
    vocab_size: int = Field(8192, ge=256, le=65536)
    dir: Path | None = Field(None, description="prepared data; default <workspace>/data")


class SandboxConfig(_Section):
    backend: Literal["auto", "docker", "local", "slurm"] = Field(
        "auto", description="docker or slurm for real runs; local is a development backend (one uid, no mount "
                            "namespace: no uid-wide kill of the candidate, no kernel-enforced disk quota)")
    image: str = "autoresearch-trainer:latest"
    memory_gb: float = Field(16.0, gt=0)
    cpus: float = Field(0.0, ge=0, description="CPU quota per run; 0 = every CPU of the host (capped at that)")
    pids: int = Field(4096, ge=64)
    shm_gb: float = Field(2.0, gt=0)
    tmpfs_gb: float = Field(4.0, gt=0)
    eval_timeout_s: float = Field(0.0, ge=0, description="eval stage limit; 0 = derived from the projected eval "
                                  "(daemon/research/cost_model.py); a set value that cannot fit is refused at start-up")
    gpu_release_timeout_s: float = Field(60.0, ge=0)


class RetentionConfig(_Section):
    """Bounded disk (`autoresearch prune`, and the daemon after each session): what is kept."""

    keep_images: int = Field(2, ge=1, le=100, description="newest trainer/base images kept per repository "
                             "(plus every image in use and the configured one)")
    keep_wheel_sets: int = Field(2, ge=1, le=100, description="newest cached wheel folders kept (a CUDA set ~2.8 GB)")
    run_days: float = Field(7.0, gt=0, description="leftover run folders older than this are removed")
    prune_after_session: bool = Field(True, description="the daemon prunes when a session ends")


class SlurmConfig(_Section):
    """The cluster backend (`[sandbox] backend = "slurm"`): each stage is one job; see deploy/slurm/README.md."""

    shared_dir: Path | None = Field(None, description="directory every node sees at the same path; job files go "
                                    "here (required for the slurm backend)")
    node_paths: list[Path] = Field(default_factory=list, description="further directories the nodes see at the "
                                   "same path (workspace, data, the trainer's install) when not under shared_dir")
    partition: str = Field("", description="partition of the stage jobs; empty = the cluster's default")
    qos: str = ""
    account: str = ""
    gres: str = Field("gpu:1", description="GPU request of each job (--gres); empty = CPU-only jobs")
    max_jobs: int = Field(1, ge=1, le=1024, description="concurrent jobs = lanes (not the local GPU count)")
    cpus_per_job: int = Field(4, ge=1, le=1024, description="CPUs each job asks for (and the container's quota)")
    time_slack_s: float = Field(120.0, ge=0, description="added to a stage's limit for --time (container start/stop)")
    poll_s: float = Field(2.0, gt=0, le=60)
    extra_args: list[str] = Field(default_factory=list, description="more sbatch options, e.g. ['--constraint=h100']")
    slurm_conf: Path | None = Field(None, description="SLURM_CONF for the client commands; default: theirs")
    jobcomp_log: Path | None = Field(None, description="jobcomp/filetxt log: states of jobs slurmctld forgot")

    @field_validator("extra_args")
    @classmethod
    def _options_only(cls, value: list[str]) -> list[str]:
        bad = [arg for arg in value if not arg.startswith("--") or "\n" in arg]
        if bad:
            raise ValueError(f"each extra sbatch argument must be one --option=value: {bad}")
        return value


class TrainingConfig(_Section):
    time_budget_s: float = Field(300.0, gt=0, description="training wall-clock budget per experiment")
    compile_budget_s: float = Field(120.0, ge=0, description="allowance for imports, compilation and export, on the "
                                    "same clock as the budget: a train stage may take compile_budget_s + "
                                    "time_budget_s + 2% from its start")
    preset: Literal["auto", "gpu", "cpu", "tiny"] = "auto"
    startup_grace_s: float = Field(120.0, ge=0, description="the train container's outer limit past compile + budget "
                                                            "(the harness's own start, copies and clean-up)")
    eval_tokens: int = Field(0, ge=0, description="target tokens scored by the eval stage; 0 = sized by the daemon "
                             "(daemon/research/cost_model.py: <= 10% of the budget, never below the probe floor)")
    probe_floor: bool = Field(True, description="refuse evals too small for the causality probe to catch a 1% "
                              "look-ahead with 99% probability; false: tests and demos only, results are then "
                              "marked as not trust-checked")
    smoke: bool = Field(True, description="smoke-run every candidate first (tiny preset, seconds, CPU, same sandbox)")
    smoke_budget_s: float = Field(2.0, gt=0, le=120, description="training seconds of a smoke run")
    smoke_eval_tokens: int = Field(2048, ge=256, description="val tokens the smoke run's eval check scores")
    smoke_repair_rounds: int = Field(2, ge=0, le=10, description="smoke failures sent back to the agent for repair")


class ModelPrice(_Section):
    """USD per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_read: float = Field(0.0, ge=0)
    cache_write: float = Field(0.0, ge=0, description="5-minute cache writes")
    cache_write_1h: float | None = Field(None, ge=0, description="1-hour cache writes; default 2 x input")

    def write_1h(self) -> float:
        return self.cache_write_1h if self.cache_write_1h is not None else 2 * self.input


def _default_prices() -> dict[str, ModelPrice]:
    return {
        "claude-sonnet-5-5": ModelPrice(input=3.0, output=15.0, cache_read=0.3, cache_write=3.75),
        "claude-opus-5-5": ModelPrice(input=15.0, output=75.0, cache_read=1.5, cache_write=18.75),
        "claude-haiku-5-5": ModelPrice(input=1.0, output=5.0, cache_read=0.1, cache_write=1.25),
    }


class AgentConfig(_Section):
    provider: Literal["auto", "anthropic", "openai", "offline"] = Field(
        "auto", description="auto: anthropic when an API key is set, else offline; openai: any OpenAI-compatible "
        "server (base_url)")
    model: str = "claude-sonnet-5-5"
    api_key: SecretStr | None = None
    api_key_file: Path | None = Field(None, description="read the API key from this file")
    base_url: str | None = None
    max_tokens: int = Field(16000, ge=256)
    temperature: float = Field(1.0, ge=0, le=2)
    timeout_s: float = Field(300.0, gt=0)
    max_retries: int = Field(6, ge=0)
    retry_backoff_s: float = Field(2.0, ge=0, description="first retry wait; doubles per attempt, with jitter")
    retry_wait_max_s: float = Field(120.0, ge=0, description="cap on one retry wait, retry-after included")
    repair_rounds: int = Field(3, ge=0)
    history_size: int = Field(30, ge=0)
    nightly_cost_cap_usd: float = Field(20.0, ge=0)
    prices: dict[str, ModelPrice] = Field(default_factory=_default_prices)
    thinking: Literal["off", "enabled", "adaptive"] = Field(
        "enabled", description="extended thinking before the tool call (Anthropic); 'adaptive' lets the model decide")
    thinking_budget_tokens: int = Field(6000, ge=1024, description="thinking budget (thinking = 'enabled'); < max_tokens")
    cache_ttl: Literal["5m", "1h"] = Field("1h", description="prompt cache lifetime of the stable prefix")
    ledger_tokens: int = Field(12000, ge=500, description="token budget of the ledger in the prompt")
    idea_searches: int = Field(4, ge=0, le=20, description="search_ideas calls the LLM agent may make per proposal "
                               "(0: no search tool); a call past it is refused and counts as a repair round")
    fallback: Literal["offline", "none"] = Field(
        "offline", description="when the LLM is capped or down: 'offline' keeps the lanes busy with the offline "
        "agent (the report says so); 'none' stops the session at the cap and waits out outages")
    fallback_after_s: float = Field(600.0, ge=0, description="how long the LLM API may fail before the fallback")
    fallback_retry_s: float = Field(300.0, ge=0, description="while on the fallback, how often the LLM is tried")
    continue_line: bool = Field(True, description="a new session continues the research line (its best, ledger, "
                                "notebook); false: every session starts over from the workspace train.py")

    @model_validator(mode="after")
    def _read_key_file(self) -> AgentConfig:
        if self.api_key_file is not None:
            try:
                key = self.api_key_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"api_key_file {str(self.api_key_file)!r} cannot be read: {exc.strerror}") from None
            if not key:
                raise ValueError(f"api_key_file {str(self.api_key_file)!r} is empty")
            object.__setattr__(self, "api_key", SecretStr(key))
        return self

    @model_validator(mode="after")
    def _thinking_fits(self) -> AgentConfig:
        if self.thinking == "off" or self.provider in ("openai", "offline"):
            return self
        if self.thinking == "enabled" and self.thinking_budget_tokens >= self.max_tokens:
            raise ValueError(f"thinking_budget_tokens ({self.thinking_budget_tokens}) must be less than max_tokens "
                             f"({self.max_tokens}): raise max_tokens or lower the budget")
        if self.temperature != 1.0:
            raise ValueError(f"temperature {self.temperature} is not allowed with extended thinking (it must be 1): "
                             "unset temperature or set thinking = 'off'")
        return self

    def resolved_provider(self) -> Literal["anthropic", "openai", "offline"]:
        if self.provider == "auto":
            return "anthropic" if self.api_key is not None else "offline"
        return self.provider


class JudgeConfig(_Section):
    """The keep rule (see `daemon.research.judge`): a sequential one-sided t-test on means with pooled noise."""

    noise_runs: int = Field(2, ge=0, description="extra baseline runs (other seeds) measuring the noise floor")
    false_keep_rate: float = Field(0.02, gt=0, lt=0.5,
                                   description="chance of keeping a change with no real effect (spent over the looks)")
    max_runs: int = Field(8, ge=1, le=10, description="runs of one candidate at most (first run + confirmations)")
    boundary_shape: float = Field(0.25, ge=0, le=0.5, description="shape of the keep boundary over the looks "
                                  "(Wang-Tsiatis): 0.5 Pocock's, the same level at every look; 0 O'Brien-Fleming's, "
                                  "strict at early looks and lenient at late ones")
    boundary_looks: Literal["keep", "all"] = Field("keep", description="keep: false_keep_rate is spent over the looks "
                                                   "at which a keep can happen (keep_min_runs .. max_runs); all: over "
                                                   "every look (the rule before round 4: stricter than its rate)")
    futility_t: float = Field(0.75, description="a close call is confirmed only while its t statistic is above this")
    min_delta: float = Field(0.0005, ge=0, description="keep only if improvement > this, whatever the noise")
    keep_min_runs: int = Field(2, ge=1, le=10, description="runs a candidate needs before a keep (a first run that "
                               "clears the boundary is confirmed first)")
    confirm_retries: int = Field(2, ge=0, le=10, description="a confirmation run that times out or is cut short "
                                 "by machine trouble is run again (same seed), up to this many times per candidate; "
                                 "0: its candidate is discarded (the rule before)")
    min_gain_sigma: float = Field(0.0, ge=0, description="the test is on improvement minus this many sigma: a "
                                  "change must be better by at least this much, not just better")
    confirm: bool = Field(True, description="confirm close calls with more seeds (false: one look only)")
    remeasure_after_keep: int = Field(2, ge=0, le=10,
                                      description="fresh runs of a new best; its recorded value is their mean")
    remeasure_every: int = Field(4, ge=0, description="re-measure the best after this many candidates (0 = never)")
    simplicity: bool = Field(True, description="within noise, a change that removes code is kept")
    simplicity_margin_sigma: float = Field(0.25, ge=0, description="non-inferiority margin (in sigma) of a change "
                                           "that removes code: kept unless it is this much worse or more")
    simplicity_alpha: float | None = Field(0.05, gt=0, lt=0.5, description="chance of keeping a code removal that "
                                           "truly costs the margin (over its looks); unset: the untested point rule")
    paired: bool = Field(True, description="judge on seed-paired differences when they are the more precise test")
    paired_min_df: int = Field(8, ge=1, description="paired noise needs this many degrees of freedom before use")
    large_change_lines: int = Field(30, ge=1, description="net added lines from which a change counts as large")
    large_change_gain_sigma: float = Field(1.0, ge=0, description="extra gain (in sigma) a large change must show")
    memory_soft_limit_mb: float | None = Field(None, gt=0, description="peak memory above this needs extra gain")
    memory_gain_sigma_per_gb: float = Field(0.5, ge=0, description="extra gain (in sigma) per GB over the soft limit")
    rule: Literal["sequential", "posterior"] = Field(
        "sequential", description="sequential: a group-sequential boundary on t over the looks (false_keep_rate per "
        "candidate, boundary_shape); "
        "posterior: keep when the posterior chance that the change is no real improvement is <= posterior_q, under "
        "a prior of effects learned from the line's judged candidates (daemon.research.prior); its defaults "
        "below are the setting docs/judge.md measured (with keep_min_runs = 1)")
    posterior_q: float = Field(0.1, gt=0, lt=0.5, description="posterior rule: the largest chance, given the runs, "
                               "that a kept change is no real improvement (its share among keeps, on average)")
    posterior_futility: float = Field(0.05, ge=0, lt=1, description="posterior rule: discard once the chance that "
                                      "the change is better by posterior_worth_sigma or more falls below this")
    posterior_worth_sigma: float = Field(1.0, ge=0, description="posterior rule: the gain (in sigma) worth more runs "
                                         "(futility asks for the chance of at least this much)")
    prior_strength: float = Field(20.0, ge=0, description="posterior rule: pseudo-candidates of the default prior "
                                  "that the fit of the line's effect distribution is shrunk toward")
    search: Literal["greedy", "archive"] = Field(
        "greedy", description="greedy: only the agent's ideas; archive: also re-try near-misses on the new best "
        "(bench/judge_sim.py: no more true gain than greedy on its landscape)")
    archive_every: int = Field(5, ge=2, description="under search = archive, every N-th candidate is a near-miss move")
    k: float = Field(2.0, ge=0, description="legacy rule only (bench comparison): keep if improvement > k * std")
    max_consecutive_crashes: int = Field(8, ge=1)


class RetestConfig(_Section):
    """The morning proof (`daemon.research.retest`): the night's start best and end best re-run on fresh seeds."""

    enabled: bool = Field(True, description="re-test at the end of each window of the daemon")
    k: int = Field(3, ge=1, le=50, description="fresh seeds per side (start best and end best run on each)")
    reserve_runs: int = Field(0, ge=0, description="runs' time reserved at the window's end; 0 = 2 k runs")
    per_keep: bool = Field(True, description="when time is left, re-test each kept change against its parent")
    transfer: bool = Field(False, description="also compare start and end best at a longer training budget")
    transfer_budget_factor: float = Field(2.0, gt=1.0, le=10.0, description="the transfer check's budget multiple")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="two-sided level of the paired t interval")

    def reserved_runs(self) -> int:
        return self.reserve_runs or 2 * self.k


class WindowConfig(_Section):
    cron: str = Field(description="crontab expression of the window's start, e.g. '0 22 * * mon-fri'")
    hours: float = Field(gt=0, le=24 * 7)
    name: str = ""

    @field_validator("cron")
    @classmethod
    def _cron_parses(cls, value: str) -> str:
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value)
        except ValueError as exc:
            raise ValueError(f"not a crontab expression ({exc})") from None
        return value

    @property
    def duration(self) -> timedelta:
        return timedelta(hours=self.hours)


class IdleConfig(_Section):
    enabled: bool = False
    utilization_below: float = Field(10.0, ge=0, le=100)
    minutes: float = Field(15.0, ge=0)
    preempt: bool = True
    poll_seconds: float = Field(10.0, gt=0)


class SchedulerConfig(_Section):
    timezone: str = "UTC"
    windows: list[WindowConfig] = Field(default_factory=list)
    idle: IdleConfig = Field(default_factory=IdleConfig)
    grace_s: float = Field(600.0, ge=0, description="how long a running experiment may finish at shutdown")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("unknown time zone (use an IANA name such as 'Europe/Berlin')") from None
        return value


class MetricsConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)
    web_config_file: Path | None = Field(
        None, description="TLS and basic auth for /metrics, / and /status.json: a web-config file in the format "
        "of Prometheus' exporters (tls_server_config, basic_auth_users); unset = plain HTTP")
    database_dir: Path | None = Field(
        None, description="Postgres' data directory when it lives on this host: the disk alert watches it too")


class ReportConfig(_Section):
    """The morning report the daemon writes when a session ends (`<workspace>/reports/session-<id>/`)."""

    on_session_end: bool = Field(True, description="write the report when a session of the daemon ends")
    webhook_url: SecretStr | None = Field(None, description="POST the report's summary here (JSON), if set")
    webhook_url_file: Path | None = Field(None, description="a file holding webhook_url (it may carry a token)")
    webhook_timeout_s: float = Field(10.0, gt=0, le=120)

    @model_validator(mode="after")
    def _read_webhook_file(self) -> ReportConfig:
        if self.webhook_url_file is not None:
            if self.webhook_url is not None:
                raise ValueError("set report.webhook_url or report.webhook_url_file, not both")
            object.__setattr__(self, "webhook_url",
                               SecretStr(_read_secret_file(self.webhook_url_file, "report.webhook_url_file")))
        if self.webhook_url is not None and not self.webhook_url.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("report.webhook_url must be an http:// or https:// URL")
        return self


class Settings(BaseSettings):
    """All settings of the daemon. Build with `load_settings`, which turns errors into `ConfigError`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    workspace: Path = Path("workspace")
    gpus: list[str] = Field(default_factory=list, description="GPU UUIDs to use; empty = every GPU NVML sees")
    instance: str = Field("", description="daemon instance name (labels, leases); default host name")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    retest: RetestConfig = Field(default_factory=RetestConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)

    @model_validator(mode="after")
    def _slurm_complete(self) -> Settings:
        if self.sandbox.backend == "slurm":
            if self.slurm.shared_dir is None:
                raise ValueError("sandbox.backend is 'slurm' but slurm.shared_dir is not set (a directory every "
                                 "node sees at the same path)")
            if self.gpus:
                raise ValueError("gpus lists local GPU UUIDs, but with the slurm backend Slurm picks the GPUs: "
                                 "remove gpus and set slurm.max_jobs and slurm.gres")
        return self

    # The TOML path is a class-level hook because pydantic-settings builds sources per class.
    _toml_path: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._toml_path))
        return tuple(sources)

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{(self.workspace / 'autoresearch.db').resolve()}"

    def public_snapshot(self) -> dict[str, Any]:
        """The settings as JSON data with every secret left out or masked: what a session stores in the DB."""
        data = self.model_dump(mode="json", exclude={"agent": {"api_key", "api_key_file"},
                                                     "report": {"webhook_url", "webhook_url_file"}})
        database = data["database"]
        database["url"] = self.database.public_url
        database.pop("url_file", None)
        database.pop("password_file", None)
        return data

    @property
    def data_dir(self) -> Path:
        return self.data.dir if self.data.dir is not None else self.workspace / "data"

    @property
    def instance_name(self) -> str:
        import socket

        return self.instance or socket.gethostname()


def _format_location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _env_origin(loc: tuple[Any, ...]) -> str | None:
    """The environment variable a value at `loc` came from (the environment wins over the file), if any."""
    parts = [str(part) for part in loc if not isinstance(part, int)]
    upper = {name.upper(): name for name in os.environ}
    for depth in range(len(parts), 0, -1):
        wanted = (ENV_PREFIX + "__".join(parts[:depth])).upper()
        if wanted in upper:
            return upper[wanted]
    return None


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        key = _format_location(err["loc"])
        env_name = _env_origin(err["loc"])
        if env_name is not None:  # blame the variable, not the file
            if err["type"] == "extra_forbidden":
                lines.append(f"environment variable {env_name}: unknown key {key!r} (check the spelling; "
                             "see README 'Configuration')")
                continue
            value = err.get("input")
            shown = "" if isinstance(value, dict) else f" = {value!r}"
            lines.append(f"environment variable {env_name}{shown}: "
                         f"{err['msg'].removeprefix('Value error, ')} (key {key})")
            continue
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"{origin}: unknown key {key!r} (check the spelling; see README 'Configuration')")
            continue
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        lines.append(f"{origin}: {key}{shown}: {message}")
    return "\n".join(lines)


def discover_config(config_path: Path | None = None) -> tuple[Path | None, bool]:
    """(the config file to read, whether it was asked for): --config, else $AUTORESEARCH_CONFIG, else
    ./autoresearch.toml, else /etc/autoresearch/autoresearch.toml, each when present; else none (defaults)."""
    if config_path is not None:
        return config_path, True
    from_env = os.environ.get(f"{ENV_PREFIX}CONFIG", "")
    if from_env:
        return Path(from_env), True
    for candidate in (DEFAULT_CONFIG_PATH, SYSTEM_CONFIG_PATH):
        if candidate.exists():
            return candidate, False
    return None, False


def load_settings(config_path: Path | None = None, **overrides: Any) -> Settings:
    """Load and validate settings; raise `ConfigError` with one line per problem.

    The file comes from `discover_config`: an explicitly given one (--config, AUTORESEARCH_CONFIG) must exist.
    """
    path, explicit = discover_config(config_path)
    if path is not None and not path.exists():
        if explicit:
            raise ConfigError(f"config file {str(path)!r} does not exist",
                              hint="run `autoresearch init`, or fix --config / AUTORESEARCH_CONFIG")
        path = None
    if path is not None:
        try:
            path.open("rb").close()
        except PermissionError:
            raise ConfigError(f"config file {str(path)!r} is not readable by this user",
                              hint="a system install keeps it private: ask to join the daemon's group, or read "
                                   "the daemon's status without it: `autoresearch status --url "
                                   "http://127.0.0.1:9464`") from None
    origin = f"config {str(path)!r}" if path is not None else "config"
    settings_cls = type("LoadedSettings", (Settings,), {"_toml_path": path})
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from None
    except ValueError as exc:  # TOML syntax errors and env values that are not JSON for nested keys
        raise ConfigError(f"{origin}: {exc}") from None
