"""Stats service RSS over a long stream: is memory flat once the budget's shares are full?

    python -m benchmarks --rss-events 10000000 [--rss-samples 20]

Starts the stats service (default settings, so the 200 MiB memory budget) on a fresh topic and
state directory, then produces `--rss-events` generated events to the topic (keyed by user, as
ingest does) while the service consumes them, and prints the service's RSS each time the
events it applied cross another `events / samples`. The events are made on the fly (200,000
users, 10,000 media, event times spread over the last 30 days), never held in memory at once.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from benchmarks.measure import PeakRss, free_port
from benchmarks.stats import WORKDIR, produce
from viewevents.kafka import user_key
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import stats_service_pb2_grpc as pb_grpc
from viewevents.v1 import view_event_pb2 as ve
from viewevents_tools import settings_catalogue as settings

USERS = 200_000
MEDIA = 10_000
SPAN_S = 30 * 86400
CHUNK = 50_000


def stream_records(events: int, seed: int = 11) -> Iterator[tuple[bytes, bytes]]:
    """`events` distinct view events as (key, value) records, made chunk by chunk."""
    rng = np.random.default_rng(seed)
    end = int(time.time()) - 3600
    event = ve.ViewEvent()
    for first in range(0, events, CHUNK):
        count = min(CHUNK, events - first)
        users = rng.integers(1, USERS + 1, count).tolist()
        media = rng.zipf(1.3, count) % MEDIA + 1
        types = rng.choice([1, 2, 2, 2, 3, 4], count).tolist()
        times = (end - rng.integers(0, SPAN_S, count)).tolist()
        for i, (user, item, kind, at) in enumerate(
            zip(users, media.tolist(), types, times, strict=True)
        ):
            event.event_id = f"rss-{first + i}"
            event.user_id = user
            event.media_id = item
            event.event_type = kind
            event.event_time.seconds = at
            yield user_key(user), event.SerializeToString()


async def _applied(stub: pb_grpc.StatsServiceStub) -> int | None:
    """Events the service has applied (its position), or None when it did not answer (a busy
    service on a loaded machine may take seconds: the timeout is generous)."""
    try:
        reply = await stub.ListTopMedia(
            pb.ListTopMediaRequest(start_time={"seconds": 0}, end_time={"seconds": 60}, limit=1),
            timeout=30,
        )
    except grpc.aio.AioRpcError:
        return None
    return sum(p.offset for p in reply.position.partitions)


async def _sample(
    stub: pb_grpc.StatsServiceStub,
    process: subprocess.Popen,
    events: int,
    samples: int,
    out: list[dict[str, Any]],
) -> None:
    """Record (events applied, RSS) each time the applied count crosses the next step."""
    step = max(1, events // samples)
    target = step
    memory = psutil.Process(process.pid)
    started = time.perf_counter()
    while target <= events:
        if process.poll() is not None:
            raise RuntimeError("stats service exited during the stream")
        applied = await _applied(stub) or 0
        if applied >= target:
            rss = memory.memory_info().rss / 2**20
            out.append(
                {
                    "applied": applied,
                    "rss_mb": round(rss, 1),
                    "s": round(time.perf_counter() - started),
                }
            )
            print(f"  {applied:>12,} events applied  RSS {rss:7.1f} MiB", flush=True)
            while target <= applied:
                target += step
            continue
        await asyncio.sleep(0.5)


async def _run(config: settings.Config, events: int, samples: int) -> dict[str, Any]:
    log_path = WORKDIR / f"rss-stream-{uuid.uuid4().hex[:8]}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "stats_service"],
        env=settings.to_environment(config),
        stdout=open(log_path, "ab"),
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parent.parent,
    )
    peak = PeakRss(process.pid)
    out: list[dict[str, Any]] = []
    try:
        async with grpc.aio.insecure_channel(config.stats_address) as channel:
            stub = pb_grpc.StatsServiceStub(channel)
            sampling = asyncio.create_task(_sample(stub, process, events, samples, out))
            rate = await produce(config, stream_records(events), total=events)
            await sampling
        return {
            "events": events,
            "produced_events_per_s": round(rate),
            "samples": out,
            "peak_rss_mb": round(peak.peak_mb(), 1),
            "service_log": str(log_path),
        }
    finally:
        peak.stop()
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def run_rss_stream(bootstrap: str, events: int, samples: int = 20) -> dict[str, Any]:
    """Stream `events` through a fresh stats service; its RSS at `samples` even event counts."""
    run_id = uuid.uuid4().hex[:8]
    config = settings.load(env={}).replace(
        kafka_bootstrap=bootstrap,
        view_topic=f"bench-rss-{run_id}",
        dead_letter_topic=f"bench-rss-dlq-{run_id}",
        stats_group=f"bench-rss-{run_id}",
        stats_address=f"127.0.0.1:{free_port()}",
        stats_state_dir=str(WORKDIR / f"rss-state-{run_id}"),
        stats_metrics_port=0,
    )
    print(
        f"streaming {events:,} events through the stats service (RSS every {events // samples:,})"
    )
    try:
        return asyncio.run(_run(config, events, samples))
    finally:
        subprocess.run(["rm", "-rf", config.stats_state_dir], check=False)
