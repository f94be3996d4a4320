"""Test helpers: the local broker, services as real subprocesses, health waits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from viewevents_tools import settings_catalogue as settings

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")
TEST_KAFKA_PORT = int(os.environ.get("VIEWEVENTS_TEST_KAFKA_PORT", "19092"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_config(bootstrap: str, **overrides: object) -> settings.Config:
    """A configuration with fresh topic names, so tests never see each other's events."""
    base = settings.load(env={})
    values: dict[str, object] = dict(
        kafka_bootstrap=bootstrap,
        view_topic=unique_name("view-events"),
        dead_letter_topic=unique_name("dead-letter"),
        ingest_metrics_port=0, stats_metrics_port=0, recommender_metrics_port=0,
    )
    values.update(overrides)
    return base.replace(**values)


test_config.__test__ = False  # a helper, not a test, when imported into a test module


def config_env(config: settings.Config) -> dict[str, str]:
    """The environment variables that make a service subprocess use `config`."""
    return settings.to_environment(config)


RUNNING: list[ServiceProcess] = []  # killed at the end of the session, whatever happened


class ServiceProcess:
    """A service run as `python -m module` with a configuration, like in production."""

    def __init__(self, module: str, config: settings.Config, address: str, log_path: Path) -> None:
        self.module = module
        self.config = config
        self.address = address
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> ServiceProcess:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module], env=config_env(self.config), cwd=REPO,
            stdout=log, stderr=subprocess.STDOUT)
        RUNNING.append(self)
        return self

    def wait_serving(self, timeout: float = 120.0) -> None:
        """Until grpc.health.v1 says SERVING (consumers: caught up)."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"{self.module} exited: {self.tail()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"{self.module} not SERVING after {timeout} s: {self.tail()}")

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int | None:
        """SIGTERM: graceful shutdown."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode if self.process else None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def ensure_broker(port: int = TEST_KAFKA_PORT) -> bool:
    """Start the test broker unless one answers; True when this call started it."""
    if port_open(port):
        return False
    env = dict(os.environ, KAFKA_PORT=str(port),
               KAFKA_DATA_DIR=str(REPO / ".data" / f"test-kafka-{port}"))
    subprocess.run([str(REPO / "deploy" / "kafka.sh"), "start"], env=env, check=True)
    return True


def stop_broker(port: int = TEST_KAFKA_PORT) -> None:
    env = dict(os.environ, KAFKA_PORT=str(port),
               KAFKA_DATA_DIR=str(REPO / ".data" / f"test-kafka-{port}"))
    subprocess.run([str(REPO / "deploy" / "kafka.sh"), "stop"], env=env, check=False)


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `condition` until it returns a truthy value (returned) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached in {timeout:.0f} s")
        time.sleep(interval)


def iter_chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


async def partitions_of(bootstrap: str, topic: str) -> list[int]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [description] = await admin.describe_topics([topic])
        return sorted(p["partition"] for p in description["partitions"])
    finally:
        await admin.close()


def read_topic(bootstrap: str, topic: str, timeout: float = 60.0) -> list:
    """Every record of `topic` from the beginning up to its current end offsets."""
    import asyncio

    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def read() -> list:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest")
        await consumer.start()
        try:
            partitions = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends = await consumer.end_offsets(partitions)
            records: list = []
            deadline = time.monotonic() + timeout
            while any([await consumer.position(tp) < ends[tp] for tp in partitions]):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reading {topic} took longer than {timeout} s")
                for batch in (await consumer.getmany(timeout_ms=500, max_records=50_000)).values():
                    records.extend(batch)
            return records
        finally:
            await consumer.stop()

    return asyncio.run(read())
