"""GroupLagReader against the real broker: end offsets minus committed offsets, partitions never
committed counted whole, and partitions added to the topic later included."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic

from tests.support import unique_name
from viewevents.group_lag import GroupLag, GroupLagReader


async def _produce(bootstrap: str, topic: str, counts: dict[int, int]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for partition, count in counts.items():
            for n in range(count):
                await producer.send_and_wait(
                    topic, f"{partition}-{n}".encode(), partition=partition
                )
    finally:
        await producer.stop()


async def _commit(bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in offsets])
        await consumer.commit({TopicPartition(topic, p): o for p, o in offsets.items()})
    finally:
        await consumer.stop()


def test_lag_is_what_each_group_has_left_to_read_including_partitions_added_later(
    kafka_bootstrap: str,
) -> None:
    topic, group, absent = unique_name("lag"), unique_name("g"), unique_name("never")

    async def run() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        reader = GroupLagReader(kafka_bootstrap, topic, [group, absent], partitions_refresh_s=0)
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
            await _produce(kafka_bootstrap, topic, {0: 3, 1: 2})
            await _commit(kafka_bootstrap, group, topic, {0: 1})  # partition 1 never committed
            assert await reader.read() == {
                group: GroupLag(records=(3 - 1) + 2, committed=1),
                absent: GroupLag(records=5, committed=0),
            }
            await admin.create_partitions({topic: NewPartitions(total_count=3)})
            await _produce(kafka_bootstrap, topic, {2: 4})
            await _commit(kafka_bootstrap, group, topic, {0: 3, 1: 2})
            assert await reader.read() == {
                group: GroupLag(records=4, committed=5),
                absent: GroupLag(records=9, committed=0),
            }
        finally:
            await reader.close()
            await admin.delete_topics([topic])
            await admin.close()

    asyncio.run(run())
