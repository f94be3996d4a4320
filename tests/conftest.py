"""Fixtures: the real local Kafka broker (started once per session unless running).

Every test under tests/integration and tests/e2e is marked `integration` by its directory, so
`pytest -m "not integration"` and `pytest tests/unit` select the same unit tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import ensure_broker, stop_broker
from tests.support.configs import TEST_KAFKA_PORT, free_port, test_config
from tests.support.processes import RUNNING, ServiceProcess

TESTS = Path(__file__).resolve().parent
NEEDS_BROKER = (TESTS / "integration", TESTS / "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark by directory: a test's place says what it needs, not a line each module repeats."""
    for item in items:
        if any(Path(item.path).is_relative_to(folder) for folder in NEEDS_BROKER):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    started = ensure_broker(TEST_KAFKA_PORT)
    yield f"127.0.0.1:{TEST_KAFKA_PORT}"
    if started:
        stop_broker(TEST_KAFKA_PORT)


@pytest.fixture(scope="session", autouse=True)
def no_stray_services() -> Iterator[None]:
    """Service subprocesses never outlive the test session, even when a test failed."""
    yield
    for service in RUNNING:
        service.kill()


@pytest.fixture
def service_log(tmp_path: Path) -> Path:
    return tmp_path / "service.log"


@pytest.fixture(scope="module")
def ingest(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """An ingest service with default settings and fresh topics, shared by a test module."""
    config = test_config(kafka_bootstrap, ingest_address=f"127.0.0.1:{free_port()}")
    log = tmp_path_factory.mktemp("ingest") / "ingest.log"
    service = ServiceProcess("ingest_service", config, config.ingest_address, log).start()
    service.wait_serving()
    yield service
    service.stop()
