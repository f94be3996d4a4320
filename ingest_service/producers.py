"""The ingest service's Kafka producer, replaced by a fresh one when it fails for good.

An idempotent producer whose sequence broke (OutOfOrderSequenceNumber after a rejected batch,
UnknownProducerId, ...) fails every later batch of that partition: restarting the service was
the only cure. Here the RPC that saw the failure replaces the producer; RPCs still holding the
old one fail (UNAVAILABLE), and their retries use the new one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaProducer

log = logging.getLogger(__name__)


class Producers:
    """Holds the current producer; `replace` swaps a failed one exactly once."""

    def __init__(
        self, factory: Callable[[], AIOKafkaProducer], stop_timeout_seconds: float
    ) -> None:
        self._factory = factory
        self._stop_timeout = stop_timeout_seconds
        self._current: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task] = set()
        self.replacements = 0

    async def start(self) -> AIOKafkaProducer:
        """Start the first producer; one that fails to start is stopped, so retrying is safe."""
        producer = self._factory()
        try:
            await producer.start()
        except BaseException:
            await self._stop(producer)
            raise
        self._current = producer
        return producer

    @property
    def current(self) -> AIOKafkaProducer:
        assert self._current is not None, "start() first"
        return self._current

    async def replace(self, failed: AIOKafkaProducer, reason: BaseException) -> None:
        """Start a fresh producer in place of `failed` unless another RPC already did."""
        async with self._lock:
            if failed is not self._current:
                return
            log.error("replacing the Kafka producer after %r", reason)
            fresh = self._factory()
            try:
                await asyncio.wait_for(fresh.start(), self._stop_timeout)
            except BaseException:
                # Kafka unreachable: keep the old one; the next failure tries again.
                task = asyncio.ensure_future(self._stop(fresh))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
                raise
            self._current = fresh
            self.replacements += 1
        task = asyncio.ensure_future(self._stop(failed))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _stop(self, producer: AIOKafkaProducer) -> None:
        try:
            await asyncio.wait_for(producer.stop(), self._stop_timeout)
        except Exception as error:  # noqa: BLE001 - a retired producer may fail in any way
            log.warning("the replaced producer did not stop cleanly: %r", error)

    async def stop(self) -> bool:
        """Stop the current producer (flushing what it holds) and any retiring one; False when
        Kafka did not take the last batches within the timeout."""
        await asyncio.gather(*self._retiring, return_exceptions=True)
        if self._current is None:
            return True
        try:
            await asyncio.wait_for(self._current.stop(), self._stop_timeout)
            return True
        except TimeoutError:
            return False
