"""Benchmark runs leave no topics behind (benchmarks.scratch): the ones registered are deleted,
ones never created are skipped, and topics nobody registered stay."""

from __future__ import annotations

import asyncio

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from benchmarks import scratch
from tests.support.configs import unique_name
from tests.support.waits import wait_for


async def _create(bootstrap: str, topics: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1) for topic in topics])
    finally:
        await admin.close()


async def _topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def test_registered_topics_are_deleted_and_others_kept(kafka_bootstrap: str) -> None:
    made, kept, never = unique_name("scratch-made"), unique_name("scratch-kept"), "never-made"
    asyncio.run(_create(kafka_bootstrap, [made, kept]))
    scratch.scratch_topics(kafka_bootstrap, made, unique_name(never))
    scratch.drop_scratch_topics()
    # Deletion is asynchronous on the broker: wait until the listing no longer has it.
    wait_for(lambda: made not in asyncio.run(_topics(kafka_bootstrap)), timeout=60)
    assert kept in asyncio.run(_topics(kafka_bootstrap))
    scratch.drop_scratch_topics()  # nothing registered any more: a no-op
