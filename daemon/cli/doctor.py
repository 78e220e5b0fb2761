"""`autoresearch doctor`: check what the service needs on this machine, each line with how to fix it."""

from __future__ import annotations

import platform
import socket
import sys
from collections.abc import Callable

from daemon.cli.check import FAIL, OK, WARN, Check
from daemon.cli.tables import render_table
from daemon.config import Settings
from sandbox.gpu import GpuProbe
from sandbox.images import LABEL_PREFIX, TORCH_VERSION


def check_python() -> Check:
    version = platform.python_version()
    return Check("python", OK, f"{version} ({sys.executable})")


def check_torch(backend: str = "local") -> Check:
    """torch on this host: needed only by the local backend; with Docker or Slurm the trainer image has it."""
    try:
        import torch
    except ImportError:
        if backend in ("docker", "slurm", "auto"):
            return Check("torch", OK, f"not installed on the host: not needed (the {backend} backend trains in "
                                      "the trainer image)")
        return Check("torch", FAIL, "not installed: the local backend trains on this host",
                     "pip install 'autoresearch-daemon[local]' (development), or use the docker backend")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return Check("torch", OK, f"{torch.__version__}, CUDA {torch.version.cuda}: {names}")
    return Check("torch", WARN, f"{torch.__version__}, no CUDA GPU: CPU preset only",
                 "on a GPU server install a CUDA build of torch and the NVIDIA driver")


def check_docker(settings: Settings) -> list[Check]:
    try:
        import docker
        from docker.errors import DockerException, ImageNotFound

        client = docker.from_env(timeout=5)
        info = client.version()
    except Exception as exc:  # any failure to talk to the engine means "not reachable"
        verdict = FAIL if settings.sandbox.backend == "docker" else WARN
        return [Check("docker engine", verdict, f"not reachable ({type(exc).__name__})",
                      "install docker.io and start dockerd; add this user to the docker group")]
    checks = [Check("docker engine", OK, f"Docker {info.get('Version')} (API {info.get('ApiVersion')})")]
    try:
        checks.append(image_check(settings.sandbox.image, client.images.get(settings.sandbox.image).labels or {}))
    except ImageNotFound:
        checks.append(Check("trainer image", FAIL, f"{settings.sandbox.image} missing",
                            "autoresearch image build (or: autoresearch image build --offline)"))
    except DockerException as exc:
        checks.append(Check("trainer image", FAIL, str(exc)[:80], "check the Docker engine"))
    finally:
        client.close()
    return checks


def image_check(tag: str, labels: dict[str, str]) -> Check:
    """The trainer image line: its torch and CUDA versions from the labels `autoresearch image build` sets."""
    found = {key[len(LABEL_PREFIX):]: value for key, value in labels.items() if key.startswith(LABEL_PREFIX)}
    if "torch" not in found:
        return Check("trainer image", WARN, f"{tag}: no version labels (built by another recipe)",
                     "autoresearch image build (records torch and CUDA versions)")
    cuda = found.get("torch_cuda", "none")
    detail = (f"{tag}: torch {found['torch']}, " + (f"CUDA {cuda}" if cuda != "none" else "CPU build")
              + f" ({found.get('variant', '?')} variant, {found.get('base', '?')} base)")
    if found["torch"] != TORCH_VERSION:
        return Check("trainer image", WARN, detail, f"rebuild: this version of the daemon pins torch {TORCH_VERSION}")
    return Check("trainer image", OK, detail)


def check_database(settings: Settings) -> Check:
    from daemon.store.migrate import schema_state

    url = settings.database_url
    shown = url.split("@")[-1] if "@" in url else url
    if url.startswith("sqlite:///") and not settings.workspace.is_dir() and not settings.database.url:
        return Check("database", WARN, f"workspace {str(settings.workspace)!r} does not exist yet",
                     "autoresearch init (creates the workspace and its SQLite database)")
    try:
        current, head = schema_state(url)
    except Exception as exc:  # connection refused, bad URL, missing driver: all say "unreachable"
        return Check("database", FAIL, f"{shown}: {str(exc).splitlines()[0][:80]}",
                     "check database.url; for Postgres: is the server running and the database created?")
    if current is None:
        return Check("database", WARN, f"{shown}: reachable, not migrated", "autoresearch db upgrade")
    if current != head:
        return Check("database", WARN, f"{shown}: schema {current}, code wants {head}", "autoresearch db upgrade")
    return Check("database", OK, f"{shown}: schema {current} (current)")


def check_metrics_port(settings: Settings) -> Check:
    host, port = settings.metrics.host, settings.metrics.port
    if port == 0:
        return Check("metrics port", OK, "disabled (port 0)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return Check("metrics port", WARN, f"{host}:{port} in use ({exc.strerror})",
                         "stop what holds it or set metrics.port (a running daemon holds it too)")
    return Check("metrics port", OK, f"{host}:{port} free")


def check_api_key(settings: Settings) -> Check:
    provider = settings.agent.resolved_provider()
    if settings.agent.api_key is not None:
        return Check("api key", OK, f"set; agent: {provider} ({settings.agent.model})")
    if provider == "anthropic":
        return Check("api key", FAIL, "agent.provider is anthropic but no key is set",
                     "set AUTORESEARCH_AGENT__API_KEY_FILE or agent.api_key")
    return Check("api key", WARN, "not set: the offline agent (hyperparameter search) will be used",
                 "set AUTORESEARCH_AGENT__API_KEY_FILE to use the Anthropic agent")


CAPACITY = "capacity"


def check_capacity(settings: Settings, probe: GpuProbe | None = None) -> list[Check]:
    """The night's plan on this machine (daemon.research.cost_model): eval size, eval timeout, train stage; a
    configuration that cannot finish inside its limits is FAIL with the numbers and the fix (exit 2)."""
    from daemon.service.runtime import default_probe, night_plan

    try:
        plan = night_plan(settings, probe if probe is not None else default_probe(), settings.sandbox.backend)
    except Exception as exc:  # e.g. NVML answering garbage: say so, the other checks still run
        return [Check(CAPACITY, WARN, f"could not project the night ({type(exc).__name__}: {str(exc)[:80]})")]
    if plan.problems:
        return [Check(CAPACITY, FAIL, problem, fix) for problem, fix in plan.problems]
    return [Check(CAPACITY, OK, line) for line in plan.lines()]


def exit_code(checks: list[Check]) -> int:
    """2 (the config-error code: systemd does not restart into it) when the night cannot fit; 1 for any other
    FAIL; 0 when ready."""
    if any(c.name == CAPACITY and c.verdict == FAIL for c in checks):
        return 2
    return 1 if any(c.verdict == FAIL for c in checks) else 0


def _slurm_checks(settings: Settings) -> list[Check]:
    from daemon.cli.doctor_slurm import check_slurm  # loaded only when a Slurm backend is checked

    return check_slurm(settings)


def run_checks(settings: Settings) -> list[Check]:
    runners: list[Callable[[], Check | list[Check]]] = [
        check_python,
        lambda: check_torch(settings.sandbox.backend),
        lambda: check_docker(settings),
        lambda: check_database(settings),
        lambda: check_metrics_port(settings),
        lambda: check_api_key(settings),
        lambda: _slurm_checks(settings),
        lambda: check_capacity(settings),
    ]
    checks: list[Check] = []
    for runner in runners:
        result = runner()
        checks.extend(result if isinstance(result, list) else [result])
    return checks


def render(checks: list[Check]) -> str:
    rows = [(c.name, c.verdict, c.detail, c.fix) for c in checks]
    table = render_table(("check", "verdict", "detail", "how to fix"), rows, max_width=90)
    failed = [c.name for c in checks if c.verdict == FAIL]
    verdict = f"verdict: NOT READY ({', '.join(failed)})" if failed else "verdict: ready"
    # The night's plan in full (the table cuts long lines): its numbers are what a refusal is about.
    plan = [f"  {c.verdict}: {c.detail}" + (f"\n    fix: {c.fix}" if c.fix else "") for c in checks if c.name == CAPACITY]
    return f"{table}\n\n" + ("the night on this machine:\n" + "\n".join(plan) + "\n\n" if plan else "") + verdict
