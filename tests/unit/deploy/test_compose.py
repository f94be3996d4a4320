"""deploy/docker-compose.yml checked statically against the code (no Docker engine here)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support import REPO
from viewevents_tools import settings_catalogue as settings

COMPOSE_TEXT = (REPO / "deploy" / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
DOCKERFILE = (REPO / "deploy" / "Dockerfile").read_text()
DOCKERIGNORE = (REPO / ".dockerignore").read_text().split()
ENTRYPOINT = REPO / "deploy" / "entrypoint.sh"
ENV_NAMES = {s.env: s for s in settings.ALL_SETTINGS}

# compose service -> (module, address setting, metrics port setting, state dir setting)
SERVICES = {
    "ingest": ("ingest_service", "ingest_address", "ingest_metrics_port", None),
    "stats": ("stats_service", "stats_address", "stats_metrics_port", "stats_state_dir"),
    "recommender": (
        "recommender_service",
        "recommender_address",
        "recommender_metrics_port",
        "recommender_state_dir",
    ),
}


# Services meant to run as several replicas (`up --scale stats=2 --scale recommender=2`).
SCALED = ("stats", "recommender")


def env_of(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in COMPOSE["services"][name]["environment"].items()}


def setting_env(name: str) -> str:
    return next(s.env for s in settings.ALL_SETTINGS if s.name == name)


def mounts_of(name: str) -> dict[str, dict]:
    """target -> long-syntax mount of a service (short syntax is not used in this file)."""
    volumes = COMPOSE["services"][name].get("volumes", [])
    assert all(isinstance(v, dict) for v in volumes), f"{name}: use the long volume syntax"
    return {v["target"]: v for v in volumes}


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
    ports = COMPOSE["services"][name]["ports"]
    assert {p.rsplit(":", 1)[1] for p in ports} == {grpc_port, metrics_port}
    for port in ports:
        host, container = port.rsplit(":", 1)
        if name in SCALED:
            # `--scale` must not clash: by default Docker picks a host port per replica.
            assert re.fullmatch(r"\$\{HOST_PORT_[A-Z_]+:-\}", host), port
        else:
            # Host ports can be moved (make compose-check does); the defaults are the container's.
            default = re.fullmatch(r"\$\{HOST_PORT_[A-Z_]+:-(\d+)\}", host)
            assert default is not None, port
            assert default.group(1) == container
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
    mounts = mounts_of(name)
    if state_setting:
        state_dir = env[setting_env(state_setting)]
        assert state_dir in mounts, f"{name}: state dir {state_dir} is not on a volume"
        assert mounts[state_dir]["type"] == "volume"
        assert mounts[state_dir]["source"] in COMPOSE["volumes"], "state must be on a named volume"
        # A fresh named volume takes the owner of the image's directory: the exact mount point
        # must exist in the image, owned by the service user (else root-owned: PermissionError).
        assert re.search(rf"mkdir -p [^\n]*{re.escape(state_dir)}(\s|$)", DOCKERFILE)
        assert "chown -R viewevents:viewevents /var/lib/viewevents" in DOCKERFILE
        assert state_dir.startswith("/var/lib/viewevents/")
    for tls_key in ("VIEWEVENTS_TLS_CERT_FILE", "VIEWEVENTS_TLS_KEY_FILE"):
        assert env[tls_key].startswith("/certs/") and "/certs" in mounts
    certs = mounts["/certs"]
    assert certs["type"] == "bind" and certs["read_only"] is True
    # A missing certs directory must fail `up`, not be created empty by Docker.
    assert certs["bind"]["create_host_path"] is False
    assert certs["source"] == "${VIEWEVENTS_CERTS_DIR:-./certs}"
    assert service["group_add"] == ["${VIEWEVENTS_CERTS_GID:-10001}"], "server.key is 0640"
    assert service["restart"] == "unless-stopped"
    assert service["depends_on"]["kafka"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", SCALED)
def test_replicas_can_scale_with_own_stores_and_tls_between_them(name: str) -> None:
    """Nothing per container is fixed (name, host port, hostname), each replica keeps its own
    RocksDB in the shared volume, advertises its own hostname, and checks peers' certificates
    against a name the certificate has (deploy/make-certs.sh), with the CA as root."""
    service = COMPOSE["services"][name]
    env = env_of(name)
    assert not {"container_name", "hostname"} & set(service), "fixed names clash under --scale"
    assert env["VIEWEVENTS_STATE_DIR_SHARED"] == "true"
    assert ENV_NAMES["VIEWEVENTS_STATE_DIR_SHARED"].kind(env["VIEWEVENTS_STATE_DIR_SHARED"])
    # Default advertised address: the container's hostname (its id), which Docker's DNS resolves.
    assert f"VIEWEVENTS_{name.upper()}_ADVERTISED_ADDRESS" not in env
    assert env[f"VIEWEVENTS_{name.upper()}_ADDRESS"].startswith("0.0.0.0:")
    assert env["VIEWEVENTS_TLS_PEER_CA_FILE"] == "/certs/ca.pem"
    peer_name = env["VIEWEVENTS_TLS_PEER_SERVER_NAME"]
    make_certs = (REPO / "deploy" / "make-certs.sh").read_text()
    found = re.search(r"subjectAltName=([^\\\n]*)", make_certs)
    assert found is not None, "make-certs.sh sets no subjectAltName"
    san = found.group(1).split(",")
    assert f"DNS:{peer_name}" in san


def test_kafka_is_official_kraft_and_matches_the_bootstrap() -> None:
    kafka = COMPOSE["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:4.")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    advertised = kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    for name in SERVICES:
        bootstrap = env_of(name)["VIEWEVENTS_KAFKA_BOOTSTRAP"]
        assert f"PLAINTEXT://{bootstrap}" == advertised


def test_no_variable_is_required_so_down_logs_ps_work_without_deploy_env() -> None:
    assert ":?" not in COMPOSE_TEXT and not re.search(r"\$\{\w+\?", COMPOSE_TEXT)
    assert env_of("ingest")["VIEWEVENTS_INGEST_TOKEN"] == "${VIEWEVENTS_INGEST_TOKEN:-}"


def test_image_is_built_once_and_never_pulled() -> None:
    services = {name: COMPOSE["services"][name] for name in SERVICES}
    assert [name for name, s in services.items() if "build" in s] == ["ingest"]
    assert {s["image"] for s in services.values()} == {"${VIEWEVENTS_IMAGE:-viewevents:local}"}
    assert services["ingest"]["pull_policy"] == "build"
    assert all(s["pull_policy"] == "never" for name, s in services.items() if name != "ingest")
    build = services["ingest"]["build"]
    assert build == {"context": "..", "dockerfile": "deploy/Dockerfile"}


def test_dockerfile_has_no_volume_and_runs_as_10001() -> None:
    assert not re.search(r"^\s*VOLUME\b", DOCKERFILE, re.MULTILINE), (
        "VOLUME leaves anonymous volumes"
    )
    assert "--uid 10001 --gid 10001" in DOCKERFILE and "USER viewevents" in DOCKERFILE
    assert "COPY deploy/entrypoint.sh /usr/local/bin/viewevents-entrypoint" in DOCKERFILE
    assert 'ENTRYPOINT ["viewevents-entrypoint"]' in DOCKERFILE


def test_kafka_has_a_cluster_id_of_its_own() -> None:
    kafka = COMPOSE["services"]["kafka"]
    assert kafka["environment"]["CLUSTER_ID"] == "${KAFKA_CLUSTER_ID:-}"
    script = kafka["command"][-1]
    assert kafka["command"][:2] == ["/bin/sh", "-c"]
    assert 'if [ -z "$$CLUSTER_ID" ]' in script and "deploy/init.sh" in script
    assert script.rstrip().endswith("exec /etc/kafka/docker/run"), "the official image's CMD"
    # The image declares these as VOLUMEs; without a mount each `up` leaves anonymous volumes.
    assert set(kafka["tmpfs"]) == {"/etc/kafka/secrets", "/mnt/shared/config"}


def test_dockerignore_keeps_secrets_and_generated_files_out() -> None:
    for entry in (
        "deploy/certs",
        "**/.env",
        "**/*.key",
        ".venv",
        ".cache",
        ".data",
        "state",
        "bench-results",
        "viewevents/v1",
        ".git",
    ):
        assert entry in DOCKERIGNORE, entry
    for needed in (
        "protos",
        "viewevents",
        "deploy",
        "README.md",
        "pyproject.toml",
        *(m for m, *_ in SERVICES.values()),
    ):
        assert needed not in DOCKERIGNORE, needed


def run_entrypoint(env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *command],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=10,
    )


def test_entrypoint_refuses_an_open_ingest_and_missing_certs(tmp_path: Path) -> None:
    refused = run_entrypoint({}, "python", "-m", "ingest_service")
    assert refused.returncode == 78 and "VIEWEVENTS_INGEST_TOKEN is empty" in refused.stderr
    assert "deploy/init.sh" in refused.stderr
    ran = run_entrypoint({"VIEWEVENTS_INGEST_TOKEN": "t"}, "echo", "-m", "ingest_service")
    assert ran.returncode == 0 and ran.stdout == "-m ingest_service\n"
    assert run_entrypoint({}, "echo", "-m", "stats_service").returncode == 0  # no token needed
    missing = run_entrypoint(
        {
            "VIEWEVENTS_TLS_CERT_FILE": str(tmp_path / "server.pem"),
            "VIEWEVENTS_TLS_KEY_FILE": str(tmp_path / "server.key"),
        },
        "echo",
        "stats_service",
    )
    assert missing.returncode == 78 and "server.pem is missing" in missing.stderr
    assert "deploy/init.sh" in missing.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_init_writes_certs_readable_by_the_container_and_a_stable_env(tmp_path: Path) -> None:
    init = [str(REPO / "deploy" / "init.sh"), str(tmp_path)]
    # The operator's umask must not matter (077 made the files unreadable to uid 10001 before).
    subprocess.run(
        ["sh", "-c", 'umask 077 && exec "$@"', "sh", *init],
        check=True,
        capture_output=True,
        timeout=60,
    )
    certs = tmp_path / "certs"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in certs.iterdir()}
    assert modes == {"ca.pem": 0o644, "server.pem": 0o644, "server.key": 0o640, "ca.key": 0o600}
    assert stat.S_IMODE(certs.stat().st_mode) == 0o755
    env = dict(line.split("=", 1) for line in (tmp_path / ".env").read_text().splitlines())
    assert set(env) == {
        "VIEWEVENTS_INGEST_TOKEN",
        "KAFKA_CLUSTER_ID",
        "VIEWEVENTS_CERTS_GID",
        "VIEWEVENTS_CERTS_DIR",
    }
    assert re.fullmatch(r"[0-9a-f]{64}", env["VIEWEVENTS_INGEST_TOKEN"])
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["KAFKA_CLUSTER_ID"])  # Kafka's base64 UUID
    assert int(env["VIEWEVENTS_CERTS_GID"]) == (certs / "server.key").stat().st_gid
    assert stat.S_IMODE((tmp_path / ".env").stat().st_mode) == 0o600
    before = {p.name: p.read_bytes() for p in certs.iterdir()}
    subprocess.run(init, check=True, capture_output=True, timeout=60)  # again: nothing changes
    assert {p.name: p.read_bytes() for p in certs.iterdir()} == before
    assert dict(line.split("=", 1) for line in (tmp_path / ".env").read_text().splitlines()) == env
