"""Producers: a producer that failed for good is replaced once, and the old one is stopped."""

from __future__ import annotations

import asyncio

from aiokafka.errors import OutOfOrderSequenceNumber

from ingest_service.producers import Producers


class FakeProducer:
    def __init__(self) -> None:
        self.started = False
        self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True


def test_a_failed_producer_is_replaced_once_and_stopped() -> None:
    async def run() -> None:
        made: list[FakeProducer] = []

        def factory() -> FakeProducer:
            made.append(FakeProducer())
            return made[-1]

        producers = Producers(factory, 1.0)
        first = await producers.start()
        error = OutOfOrderSequenceNumber()
        # two RPCs saw the same failure at once: one replacement only
        await asyncio.gather(producers.replace(first, error), producers.replace(first, error))
        assert len(made) == 2 and producers.current is made[1] and made[1].started
        assert producers.replacements == 1
        await producers.stop()
        assert first.stopped and made[1].stopped

    asyncio.run(run())
