"""The bulk fetch (viewevents.kafka_fetch) reads exactly what aiokafka's public getmany reads.

A fresh topic gets plain and gzip-compressed batches, a committed and an aborted transaction
(so control markers and aborted records), and is read both ways from the same offsets, also
from the middle of a compressed batch, with a small record budget so that results are drained
in several steps. The (partition, offset, value) sequences and the final positions must match.
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.support.broker import create_topics
from tests.support.configs import unique_name
from viewevents.kafka_fetch import BulkFetch

PARTITIONS = 3
Row = tuple[int, int, bytes | None]


async def _produce(bootstrap: str, topic: str) -> None:
    await create_topics(bootstrap, [topic], PARTITIONS)

    async def send_all(producer: AIOKafkaProducer, tag: str, count: int) -> None:
        futures = [
            await producer.send(topic, f"{tag}-{i}".encode() * (1 + i % 3), key=str(i).encode())
            for i in range(count)
        ]
        await asyncio.gather(*futures)

    for compression in (None, "gzip"):
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, compression_type=compression, linger_ms=20
        )
        await producer.start()
        try:
            await send_all(producer, f"plain-{compression}", 3_000)
        finally:
            await producer.stop()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        compression_type="gzip",
        transactional_id=unique_name("txn"),
        linger_ms=20,
    )
    await producer.start()
    try:
        async with producer.transaction():
            await send_all(producer, "committed", 1_000)
        await producer.begin_transaction()
        await send_all(producer, "aborted", 500)
        await producer.abort_transaction()
        await send_all_plain(bootstrap, topic)
    finally:
        await producer.stop()


async def send_all_plain(bootstrap: str, topic: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i in range(300):
            await producer.send(topic, f"tail-{i}".encode(), key=str(i).encode())
    finally:
        await producer.stop()


async def _read(
    bootstrap: str, topic: str, starts: dict[int, int], isolation: str, bulk: bool
) -> tuple[list[Row], dict[int, int]]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level=isolation
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, starts[tp.partition])
        ends = await consumer.end_offsets(tps)
        fetch = BulkFetch(consumer)
        assert fetch.bulk, "the internals check failed: kafka_fetch needs a look"
        rows: list[Row] = []
        for _ in range(2_000):
            if all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                break
            if bulk:
                for tp, fetched in (await fetch.getmany(timeout_ms=500, max_records=700)).items():
                    assert len(fetched.offsets) == len(fetched.values)
                    rows.extend(
                        (tp.partition, o, v) for o, v in zip(fetched.offsets, fetched.values)
                    )
                    if fetched.values:
                        assert fetched.offsets[-1] < fetched.next_offset
            else:
                for tp, records in (
                    await consumer.getmany(timeout_ms=500, max_records=700)
                ).items():
                    rows.extend((tp.partition, r.offset, r.value) for r in records)
        positions = {tp.partition: await consumer.position(tp) for tp in tps}
        return sorted(rows), positions
    finally:
        await consumer.stop()


@pytest.mark.parametrize("isolation", ["read_uncommitted", "read_committed"])
def test_bulk_fetch_reads_what_getmany_reads(kafka_bootstrap: str, isolation: str) -> None:
    topic = unique_name("bulk-fetch")
    asyncio.run(_produce(kafka_bootstrap, topic))
    for starts in ({p: 0 for p in range(PARTITIONS)}, {p: 1_234 + p for p in range(PARTITIONS)}):
        public = asyncio.run(_read(kafka_bootstrap, topic, starts, isolation, bulk=False))
        bulk = asyncio.run(_read(kafka_bootstrap, topic, starts, isolation, bulk=True))
        assert len(public[0]) > 3_000
        assert bulk == public
