"""Benchmark runs leave no topics behind (benchmarks.scratch): the ones registered are deleted,
ones never created are skipped, and topics nobody registered stay."""

from __future__ import annotations

import asyncio

from benchmarks import scratch
from tests.support.broker import create_topics, topic_names
from tests.support.configs import unique_name
from tests.support.waits import wait_for


def test_registered_topics_are_deleted_and_others_kept(kafka_bootstrap: str) -> None:
    made, kept, never = unique_name("scratch-made"), unique_name("scratch-kept"), "never-made"
    asyncio.run(create_topics(kafka_bootstrap, [made, kept]))
    scratch.scratch_topics(kafka_bootstrap, made, unique_name(never))
    scratch.drop_scratch_topics()
    # Deletion is asynchronous on the broker: wait until the listing no longer has it.
    wait_for(lambda: made not in asyncio.run(topic_names(kafka_bootstrap)), timeout=60)
    assert kept in asyncio.run(topic_names(kafka_bootstrap))
    scratch.drop_scratch_topics()  # nothing registered any more: a no-op
