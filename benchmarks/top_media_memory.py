"""Peak memory of ListTopMedia over many distinct media items (not a test: it prints figures).

Builds a stats state in-process with the real processor (no Kafka: each partition's events go
through `StatsProcessor.apply_columns` in write batches, as the consumer does), then, in fresh
child processes so that building does not count, runs ListTopMedia through the servicer and
reports each child's peak RSS (ru_maxrss) against its RSS just before the queries.

    python -m benchmarks.top_media_memory [--media 300000] [--state DIR] [--rebuild]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from stats_service.aggregation import Columns
from stats_service.processor import StatsProcessor
from stats_service.reader import StatsReader
from stats_service.request_parsing import Limits
from stats_service.servicer import StatsServicer
from viewevents.state.store import StateStore
from viewevents.state.transaction import Transaction
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import view_event_pb2

BASE = 1_767_225_600  # 2026-01-01T00:00:00Z
DAYS = 2
PARTITIONS = 4


def build(state_dir: Path, media_count: int, seed: int = 7) -> int:
    """`media_count` random media ids, each watched by 1-3 users for a few minutes at a random
    time in DAYS days; users are keyed to partitions as Kafka keys them. Returns the events."""
    rng = np.random.default_rng(seed)
    media = rng.choice(2**62, media_count, replace=False).astype(np.int64) + 1
    sessions = np.repeat(media, rng.integers(1, 4, media_count))
    users = rng.integers(1, 200_000, len(sessions))
    starts = BASE + rng.integers(0, DAYS * 86_400 - 600, len(sessions))
    # start, two waypoints, end: one session is 4 events a minute apart
    kinds = np.tile(np.array([1, 2, 2, 4]), len(sessions))
    rows = np.stack(
        [
            np.repeat(sessions, 4),
            np.repeat(users, 4),
            kinds,
            np.repeat(starts, 4) + np.tile(np.arange(4) * 60, len(sessions)),
        ],
        axis=1,
    )
    processor = StatsProcessor(30, 0)
    store = StateStore(str(state_dir))
    for partition in range(PARTITIONS):
        mine = rows[rows[:, 1] % PARTITIONS == partition]
        mine = mine[np.argsort(mine[:, 3], kind="stable")]
        for low in range(0, len(mine), 20_000):
            chunk = mine[low : low + 20_000]
            txn = Transaction(store)
            processor.apply_columns(
                partition, Columns(chunk[:, 0], chunk[:, 1], chunk[:, 2], chunk[:, 3]), txn
            )
            txn.commit()
    store.close()
    return len(rows)


class _Consumer:
    """The consumer as the servicer sees it: a position owning every partition."""

    def position(self) -> view_event_pb2.ConsumerPosition:
        return view_event_pb2.ConsumerPosition(
            partitions=[view_event_pb2.PartitionOffset(partition=p) for p in range(PARTITIONS)]
        )


class _Context:
    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


def run_queries(state_dir: Path, metric: int, concurrent: int, servicer_options: dict) -> dict:
    """In this (fresh) process: `concurrent` ListTopMedia at once over the whole data set."""
    store = StateStore(str(state_dir))
    servicer = StatsServicer(StatsReader(store), _Consumer(), Limits(), **servicer_options)
    request = pb.ListTopMediaRequest(
        start_time={"seconds": BASE},
        end_time={"seconds": BASE + DAYS * 86_400},
        metric=pb.TopMediaMetric.Name(metric),  # enum names are accepted
        limit=100,
    )
    before = psutil.Process().memory_info().rss

    async def many() -> list[pb.ListTopMediaResponse]:
        return await asyncio.gather(
            *(servicer.ListTopMedia(request, _Context()) for _ in range(concurrent))
        )

    started = time.perf_counter()
    replies = asyncio.run(many())
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    store.close()
    return {
        "metric": pb.TopMediaMetric.Name(metric),
        "concurrent": concurrent,
        "rss_before_mb": round(before / 2**20, 1),
        "peak_rss_mb": round(peak / 2**20, 1),
        "seconds": round(seconds, 2),
        "first": replies[0].media[0].media_id,
        "returned": len(replies[0].media),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.top_media_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--media", type=int, default=300_000)
    parser.add_argument("--state", default=".data/bench/top-media-memory")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # JSON: one measurement to run
    args = parser.parse_args(argv)
    state = Path(args.state)
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(run_queries(state, job["metric"], job["concurrent"], job["options"])))
        return
    if args.rebuild or not state.exists():
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir(parents=True)
        started = time.perf_counter()
        events = build(state, args.media)
        print(
            f"built {events:,} events on {args.media:,} media in "
            f"{time.perf_counter() - started:.0f} s: {state}",
            flush=True,
        )
    for metric in (pb.TOP_MEDIA_METRIC_VIEW_TIME, pb.TOP_MEDIA_METRIC_UNIQUE_VIEWERS):
        for concurrent in (1, 8):
            job = json.dumps({"metric": metric, "concurrent": concurrent, "options": {}})
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.top_media_memory",
                    "--state",
                    str(state),
                    "--child",
                    job,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            print(done.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
