"""deploy/compose.yaml: parses, every file and variable it refers to exists, and `docker compose config` agrees."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?+][^}]*)?\}")


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (DEPLOY / ".env.example").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return {key: value for key, value in pairs}


def test_stack_has_the_four_services() -> None:
    """postgres, daemon, prometheus and grafana are defined."""
    assert set(_compose()["services"]) == {"postgres", "daemon", "prometheus", "grafana"}


def test_every_variable_is_documented_in_env_example() -> None:
    """Each ${VAR} used by compose.yaml has a line in .env.example, and .env.example has no unused ones."""
    used = set(VARIABLE.findall(COMPOSE.read_text()))
    assert used == set(_env_example())


def test_relative_host_paths_exist() -> None:
    """Every relative bind mount and the build's Dockerfile point at files of this repository."""
    compose = _compose()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
        if "build" in service:
            context = DEPLOY / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).is_file()


def test_daemon_gets_docker_socket_gpus_and_the_api_key_secret() -> None:
    """The daemon mounts the host's Docker socket, reserves the GPUs and reads the key from a secret file."""
    daemon = _compose()["services"]["daemon"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in daemon["volumes"]
    devices = daemon["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert daemon["environment"]["AUTORESEARCH_AGENT__API_KEY_FILE"] == "/run/secrets/anthropic_api_key"
    assert "anthropic_api_key" in daemon["secrets"]


def test_daemon_and_prometheus_share_the_scrape_address() -> None:
    """Prometheus runs in the daemon's network namespace, so prometheus.yml's 127.0.0.1:9464 is the daemon."""
    services = _compose()["services"]
    assert services["prometheus"]["network_mode"] == "service:daemon"
    env = services["daemon"]["environment"]
    assert (env["AUTORESEARCH_METRICS__HOST"], env["AUTORESEARCH_METRICS__PORT"]) == ("127.0.0.1", "9464")


def test_grafana_environment_fills_every_datasource_variable() -> None:
    """Each ${VAR} in the provisioned datasources is set in grafana's environment."""
    provisioning = DEPLOY.parent / "grafana" / "provisioning" / "datasources" / "autoresearch.yaml"
    needed = set(VARIABLE.findall(provisioning.read_text()))
    assert needed <= set(_compose()["services"]["grafana"]["environment"])


def test_published_ports_bind_to_localhost_only() -> None:
    """No service is published on all interfaces."""
    for service in _compose()["services"].values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port


def _compose_plugin_missing() -> bool:
    if shutil.which("docker") is None:
        return True
    return subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode != 0


@pytest.mark.skipif(_compose_plugin_missing(), reason="no docker compose plugin on this machine")
def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    """`docker compose config` validates the stack with the example environment."""
    key = tmp_path / "key"
    key.write_text("sk-test\n")
    env_file = tmp_path / ".env"
    env = {**_env_example(), "ANTHROPIC_API_KEY_FILE": str(key)}
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    done = subprocess.run(["docker", "compose", "--env-file", str(env_file), "-f", str(COMPOSE), "config", "-q"],
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
