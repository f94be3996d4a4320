"""Fixtures: the real local Kafka broker (started once per session unless running)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import RUNNING, TEST_KAFKA_PORT, ensure_broker, stop_broker


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
