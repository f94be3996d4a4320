"""The services' Kafka liveness probe (viewevents.kafka.probe_metadata) asks the broker about
their own topics only, never the whole cluster's, and fails when no broker answers."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaConnectionError

from tests.support.broker import create_topics
from tests.support.configs import unique_name
from viewevents.kafka import probe_metadata


async def _probed_topics(bootstrap: str, ours: str) -> tuple[set[str], set[str]]:
    """(topics the probe's metadata answer held, topics the broker has)."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        assert not client.cluster.topics()  # its bootstrap asked about no topic
        await probe_metadata(client, [ours])
        probed = set(client.cluster.topics())
        everything = set((await client.fetch_all_metadata()).topics())
        return probed, everything
    finally:
        await client.close()


def test_probe_asks_for_our_topic_only(kafka_bootstrap: str) -> None:
    ours, other = unique_name("probe-ours"), unique_name("probe-other")
    asyncio.run(create_topics(kafka_bootstrap, [ours, other]))
    probed, everything = asyncio.run(_probed_topics(kafka_bootstrap, ours))
    assert {ours, other} <= everything  # the broker has more than our topic ...
    assert probed == {ours}  # ... and the probe was told about ours alone


class _Unanswered:
    """A client whose metadata requests no broker answers (what aiokafka reports as False)."""

    def __init__(self) -> None:
        self.tracked: set[str] = set()

    def add_topic(self, topic: str) -> None:
        self.tracked.add(topic)

    async def force_metadata_update(self) -> bool:
        return False


def test_probe_raises_when_no_broker_answers() -> None:
    client = _Unanswered()
    with pytest.raises(KafkaConnectionError):
        asyncio.run(probe_metadata(client, ["views"]))
    assert client.tracked == {"views"}
