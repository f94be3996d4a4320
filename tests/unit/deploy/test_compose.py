"""deploy/docker-compose.yml checked statically against the code (no Docker engine here)."""

from __future__ import annotations

import importlib.util
import re

import pytest
import yaml

from tests.support import REPO
from viewevents_tools import settings_catalogue as settings

COMPOSE = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
DOCKERFILE = (REPO / "deploy" / "Dockerfile").read_text()
ENV_NAMES = {s.env: s for s in settings.ALL_SETTINGS}

# compose service -> (module, address setting, metrics port setting, state dir setting)
SERVICES = {
    "ingest": ("ingest_service", "ingest_address", "ingest_metrics_port", None),
    "stats": ("stats_service", "stats_address", "stats_metrics_port", "stats_state_dir"),
    "recommender": ("recommender_service", "recommender_address", "recommender_metrics_port",
                    "recommender_state_dir"),
}


def env_of(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in COMPOSE["services"][name]["environment"].items()}


def setting_env(name: str) -> str:
    return next(s.env for s in settings.ALL_SETTINGS if s.name == name)


def test_every_product_service_is_there() -> None:
    assert set(COMPOSE["services"]) == {"kafka", *SERVICES}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_command_runs_an_existing_module(name: str) -> None:
    module = SERVICES[name][0]
    assert COMPOSE["services"][name]["command"] == ["python", "-m", module]
    assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{module} has no __main__"
    assert f"COPY {module} ./{module}" in DOCKERFILE


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_environment_names_are_real_settings_with_valid_values(name: str) -> None:
    for key, value in env_of(name).items():
        assert key in ENV_NAMES, f"{name}: {key} is not a setting the code reads"
        if "${" not in value:
            ENV_NAMES[key].kind(value)  # parses as the code would parse it


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_ports_agree_with_the_addresses(name: str) -> None:
    _, address_setting, metrics_setting, _ = SERVICES[name]
    env = env_of(name)
    grpc_port = env[setting_env(address_setting)].rsplit(":", 1)[1]
    metrics_port = env[setting_env(metrics_setting)]
    published = {p.split(":")[1] for p in COMPOSE["services"][name]["ports"]}
    assert published == {grpc_port, metrics_port}
    assert env[setting_env(address_setting)].startswith("0.0.0.0:"), "must listen beyond loopback"
    health = COMPOSE["services"][name]["healthcheck"]["test"]
    assert health[:4] == ["CMD", "python", "-m", "viewevents_tools.healthcheck"]
    assert health[4] == f"localhost:{grpc_port}"
    assert importlib.util.find_spec("viewevents_tools.healthcheck") is not None


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_state_volumes_and_tls_files(name: str) -> None:
    service = COMPOSE["services"][name]
    env = env_of(name)
    state_setting = SERVICES[name][3]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}
    if state_setting:
        state_dir = env[setting_env(state_setting)]
        assert state_dir in mounts, f"{name}: state dir {state_dir} is not on a volume"
        assert mounts[state_dir] in COMPOSE["volumes"], "state must be on a named volume"
    for tls_key in ("VIEWEVENTS_TLS_CERT_FILE", "VIEWEVENTS_TLS_KEY_FILE"):
        assert env[tls_key].startswith("/certs/") and "/certs" in mounts
    assert service["restart"] == "unless-stopped"
    assert service["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_kafka_is_official_kraft_and_matches_the_bootstrap() -> None:
    kafka = COMPOSE["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:4.")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    advertised = kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    for name in SERVICES:
        bootstrap = env_of(name)["VIEWEVENTS_KAFKA_BOOTSTRAP"]
        assert f"PLAINTEXT://{bootstrap}" == advertised


def test_ingest_requires_a_token_in_the_example() -> None:
    assert re.fullmatch(r"\$\{VIEWEVENTS_INGEST_TOKEN:\?.+\}", env_of("ingest")["VIEWEVENTS_INGEST_TOKEN"])
