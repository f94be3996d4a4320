"""Services started while Kafka is unreachable: they wait for it (with back-off, few log lines),
still exit 0 promptly on SIGTERM or SIGINT during that wait, and start serving once Kafka is up.

The first test points the services at a port where nothing listens; the second runs a broker
of its own on free ports (never the shared test broker), started only after the service.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ServiceProcess, free_port, stack_config, wait_for
from tests.support.broker import broker_env, kafka_sh
from viewevents_tools import settings_catalogue as settings

EXIT_BOUND_S = 15.0
WAITING_LINE = "waiting for Kafka"
MODULES = ("ingest_service", "stats_service", "recommender_service")


def configuration(bootstrap: str, tmp_path: Path) -> settings.Config:
    return stack_config(bootstrap, tmp_path)


def address_of(module: str, config: settings.Config) -> str:
    return {
        "ingest_service": config.ingest_address,
        "stats_service": config.stats_address,
        "recommender_service": config.recommender_address,
    }[module]


def waiting_lines(service: ServiceProcess, running: bool = True) -> int:
    """How many times the service logged that it is waiting for Kafka; with `running`, fails
    if it exited."""
    assert service.process is not None
    if running and service.process.poll() is not None:
        raise AssertionError(f"{service.module} exited early: {service.tail()}")
    return service.log_path.read_text(errors="replace").count(WAITING_LINE)


def signal_and_time(service: ServiceProcess, sig: int) -> tuple[float, int | None]:
    """Seconds from `sig` to exit (capped a little past the bound), and the exit code."""
    assert service.process is not None
    started = time.monotonic()
    service.process.send_signal(sig)
    try:
        code = service.process.wait(EXIT_BOUND_S + 10)
    except subprocess.TimeoutExpired:
        service.kill()
        return time.monotonic() - started, None
    return time.monotonic() - started, code


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_service_waiting_for_kafka_at_start_exits_0_on_a_signal(tmp_path: Path, sig: int) -> None:
    config = configuration(f"127.0.0.1:{free_port()}", tmp_path)  # nobody listens there
    services = [
        ServiceProcess(m, config, address_of(m, config), tmp_path / f"{m}.log").start()
        for m in MODULES
    ]
    # Blocked in start-up: it logged the wait twice (so it retried), and is still running.
    for service in services:

        def retried(s: ServiceProcess = service) -> bool:
            return waiting_lines(s) >= 2

        wait_for(retried, 60, message=service.tail)
    exits = {s.module: signal_and_time(s, sig) for s in services}
    print("seconds to exit while waiting for Kafka:", exits)
    for service in services:
        seconds, code = exits[service.module]
        assert code == 0 and seconds < EXIT_BOUND_S, (service.module, seconds, code, service.tail())
        # Back-off: a few lines, not many per second.
        lines = waiting_lines(service, running=False)
        assert lines < 10, (service.module, lines)


@pytest.fixture
def late_broker(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """Ports and environment of a broker of this test's own, not started yet; always stopped."""
    port = free_port()
    env = broker_env(port, tmp_path / "kafka", controller_port=free_port())
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        kafka_sh("stop", env, check=False)


def test_a_service_started_before_kafka_serves_once_kafka_is_up(
    late_broker: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    bootstrap, env = late_broker
    config = configuration(bootstrap, tmp_path)
    services = [
        ServiceProcess(m, config, address_of(m, config), tmp_path / f"{m}.log").start()
        for m in ("ingest_service", "stats_service")
    ]
    for service in services:

        def waiting(s: ServiceProcess = service) -> bool:
            return waiting_lines(s) >= 1

        wait_for(waiting, 60, message=service.tail)
    kafka_sh("start", env)
    for service in services:
        service.wait_serving(timeout=120)
    for service in services:
        assert service.stop() == 0, service.tail()
