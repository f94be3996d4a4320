"""The local Kafka broker (deploy/kafka.sh) and reading topics back as the tests' ground truth."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.support.configs import REPO, TEST_KAFKA_PORT, port_open
from viewevents.v1 import view_event_pb2 as ve


def broker_env(
    port: int, data_dir: Path | None = None, controller_port: int | None = None
) -> dict[str, str]:
    """The environment for deploy/kafka.sh to run a broker on `port` with its own data folder."""
    env = dict(
        os.environ,
        KAFKA_PORT=str(port),
        KAFKA_DATA_DIR=str(data_dir or REPO / ".data" / f"test-kafka-{port}"),
    )
    if controller_port is not None:
        env["KAFKA_CONTROLLER_PORT"] = str(controller_port)
    return env


def kafka_sh(action: str, env: dict[str, str], check: bool = True) -> None:
    """`deploy/kafka.sh start|stop` with `env` (see broker_env)."""
    subprocess.run([str(REPO / "deploy" / "kafka.sh"), action], env=env, check=check)


def ensure_broker(port: int = TEST_KAFKA_PORT) -> bool:
    """Start the test broker unless one answers; True when this call started it."""
    if port_open(port):
        return False
    kafka_sh("start", broker_env(port))
    return True


def stop_broker(port: int = TEST_KAFKA_PORT) -> None:
    kafka_sh("stop", broker_env(port), check=False)


async def create_topics(bootstrap: str, topics: list[str], partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1) for topic in topics])
    finally:
        await admin.close()


async def topic_names(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def partitions_of(bootstrap: str, topic: str) -> list[int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [description] = await admin.describe_topics([topic])
        return sorted(p["partition"] for p in description["partitions"])
    finally:
        await admin.close()


async def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    partitions = await partitions_of(bootstrap, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """{partition: end offset} of `topic` now: what a consumer must reach to have applied it all."""
    return asyncio.run(_end_offsets(bootstrap, topic))


def read_topic(bootstrap: str, topic: str, timeout: float = 60.0) -> list[ConsumerRecord]:
    """Every record of `topic` from the beginning up to its current end offsets."""

    async def read() -> list[ConsumerRecord]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            partitions = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends = await consumer.end_offsets(partitions)
            records: list[ConsumerRecord] = []
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


def read_events(bootstrap: str, topic: str) -> list[tuple[int, int, ve.ViewEvent]]:
    """(partition, offset, event) of every record of `topic`: where each event landed."""
    return [
        (r.partition, r.offset, ve.ViewEvent.FromString(r.value))
        for r in read_topic(bootstrap, topic)
    ]
