"""`viewevents dead-letters`: read rejected events back from the dead-letter topic, with reasons."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer
from google.protobuf import json_format

from viewevents.v1 import view_event_pb2
from viewevents_tools import settings_catalogue as settings


async def iter_rejected(
    bootstrap: str, topic: str, limit: int
) -> AsyncIterator[view_event_pb2.RejectedEvent]:
    """The first `limit` rejected events of the topic (from the beginning, all partitions)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        seen = 0
        while seen < limit:
            batches = await consumer.getmany(timeout_ms=2000, max_records=min(1000, limit - seen))
            if not batches:
                return
            for records in batches.values():
                for record in records:
                    yield view_event_pb2.RejectedEvent.FromString(record.value)
                    seen += 1
    finally:
        await consumer.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = settings.load()
    parser.add_argument(
        "--bootstrap", default=defaults.kafka_bootstrap, help="Kafka bootstrap servers"
    )
    parser.add_argument("--topic", default=defaults.dead_letter_topic)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def run(args: argparse.Namespace) -> int:
    async def show() -> int:
        count = 0
        async for rejected in iter_rejected(args.bootstrap, args.topic, args.limit):
            count += 1
            if args.json:
                print(json.dumps(json_format.MessageToDict(rejected)))
            else:
                reasons = "; ".join(v.description for v in rejected.field_violations)
                print(f"{rejected.event.event_id or '(no id)'}  via {rejected.source}: {reasons}")
        if not args.json:
            print(f"({count} shown)")
        return 0

    return asyncio.run(show())
