"""Benchmark topics are scratch: a run deletes the topics it made when its process exits.

Every run makes fresh topics (a fresh consumer group must start from an empty topic, and the
view topic keeps its records forever), so without this the development broker kept them all:
after a few days of runs it held 148 topics, 859 partitions and 8.2 GB of logs, which cost the
broker CPU and disk and made every later measurement on it a little less like a fresh one.
Topics a bench keeps on purpose (`--recommender-keep-topic`) are never registered here.
"""

from __future__ import annotations

import asyncio
import atexit
import logging

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)

_made: dict[str, set[str]] = {}  # bootstrap -> topics this process made there


def scratch_topics(bootstrap: str, *topics: str) -> None:
    """Delete `topics` on the broker at `bootstrap` when this process exits (normally or by an
    exception; a kill leaves them)."""
    if not _made:
        atexit.register(drop_scratch_topics)
    _made.setdefault(bootstrap, set()).update(topics)


def drop_scratch_topics() -> None:
    """Delete the registered topics now (atexit does it at the end); ones already gone or never
    created are skipped, and a broker that does not answer only costs a warning."""
    for bootstrap, topics in list(_made.items()):
        try:
            asyncio.run(_delete_existing(bootstrap, sorted(topics)))
        except (TimeoutError, KafkaError, OSError) as error:
            log.warning("could not delete the bench topics %s: %r", sorted(topics), error)
        _made.pop(bootstrap, None)


async def _delete_existing(bootstrap: str, topics: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        doomed = [topic for topic in topics if topic in existing]
        if doomed:
            await admin.delete_topics(doomed)
            print(f"deleted {len(doomed)} bench topics", flush=True)
    finally:
        await admin.close()
