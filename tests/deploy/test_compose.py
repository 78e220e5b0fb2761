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


def test_stack_has_the_six_services() -> None:
    """postgres, daemon, prometheus, alertmanager, its alert-sink and grafana are defined."""
    assert set(_compose()["services"]) == {"postgres", "daemon", "prometheus", "alertmanager", "alert-sink",
                                           "grafana"}


def test_alertmanager_ships_a_receiver_reachable_on_the_stack_network() -> None:
    """As shipped, Alertmanager loads alertmanager.compose.yml, whose every webhook is the alert-sink service
    (not its own loopback), and alert-sink runs the script of this repository on the port they name."""
    services = _compose()["services"]
    volume = next(v for v in services["alertmanager"]["volumes"] if v.endswith(":/etc/alertmanager/alertmanager.yml:ro"))
    default = re.fullmatch(r"\$\{ALERTMANAGER_CONFIG:-([^}]+)\}", volume.split(":/etc", 1)[0])
    assert default is not None, volume
    config = yaml.safe_load((DEPLOY / default.group(1)).read_text())
    urls = [hook["url"] for receiver in config["receivers"] for hook in receiver.get("webhook_configs", [])]
    assert urls and all(url.startswith("http://alert-sink:9095/") for url in urls), urls
    sink = services["alert-sink"]
    assert sink["environment"]["ALERT_SINK_LISTEN"] == "0.0.0.0:9095"
    script = next(v for v in sink["volumes"] if v.startswith("./"))
    assert (DEPLOY / script.split(":", 1)[0]).is_file()
    assert script.split(":")[1] == sink["entrypoint"][-1]
    assert "alert-sink" in services["alertmanager"]["depends_on"]
    assert "http://127.0.0.1:9095/healthz" in " ".join(sink["healthcheck"]["test"])


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
    # ...or another engine (a socket proxy, rootless Docker) through DOCKER_HOST, the host's socket by default.
    assert daemon["environment"]["DOCKER_HOST"] == "${DOCKER_HOST:-unix:///var/run/docker.sock}"
    devices = daemon["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert daemon["environment"]["AUTORESEARCH_AGENT__API_KEY_FILE"] == "/run/secrets/anthropic_api_key"
    assert "anthropic_api_key" in daemon["secrets"]


def test_every_service_is_on_the_private_network_and_none_shares_a_namespace() -> None:
    """Each service joins the stack's own network; none lives in another's network namespace."""
    compose = _compose()
    assert set(compose["networks"]) == {"autoresearch"}
    for name, service in compose["services"].items():
        assert "network_mode" not in service, name
        assert service["networks"] == ["autoresearch"], name


def test_prometheus_scrapes_the_daemon_and_alerts_alertmanager_by_service_name() -> None:
    """prometheus.compose.yml targets daemon:<metrics port> and alertmanager:9093, and compose loads it."""
    services = _compose()["services"]
    assert "--config.file=/etc/prometheus/prometheus.compose.yml" in services["prometheus"]["command"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.compose.yml").read_text())
    port = services["daemon"]["environment"]["AUTORESEARCH_METRICS__PORT"]
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == [f"daemon:{port}"]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]


def test_daemon_has_a_healthcheck_on_healthz() -> None:
    """The daemon container is checked through /healthz on its metrics port."""
    daemon = _compose()["services"]["daemon"]
    port = daemon["environment"]["AUTORESEARCH_METRICS__PORT"]
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(daemon["healthcheck"]["test"])


def test_no_password_in_any_environment() -> None:
    """Postgres and the daemon read the password from a secret file; no environment holds it."""
    services = _compose()["services"]
    for name in ("postgres", "daemon"):
        env = services[name]["environment"]
        assert not any("PASSWORD}" in str(value) or ":${" in str(value) for value in env.values()), name
        assert "postgres_password" in services[name]["secrets"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert services["daemon"]["environment"]["AUTORESEARCH_DATABASE__PASSWORD_FILE"] == "/run/secrets/postgres_password"


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
    password = tmp_path / "pg"
    password.write_text("pw\n")
    env_file = tmp_path / ".env"
    env = {**_env_example(), "ANTHROPIC_API_KEY_FILE": str(key), "POSTGRES_PASSWORD_FILE": str(password)}
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    done = subprocess.run(["docker", "compose", "--env-file", str(env_file), "-f", str(COMPOSE), "config", "-q"],
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
