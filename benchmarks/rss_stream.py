"""Stats and recommender RSS over a long stream: is memory flat once the budget's shares are full?

    python -m benchmarks --rss-events 10000000 [--rss-samples 20]

Starts the stats service and the recommender (default settings, so the 200 MiB memory budget
each) on a fresh topic and state directories, then produces `--rss-events` generated events to
the topic (keyed by user, as ingest does) while both consume them, and prints each service's
RSS (and CPU seconds so far) each time the events it applied cross another `events / samples`.
The events are made on the fly (200,000 users, 10,000 media, event times spread over the last
30 days), never held in memory at once.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from benchmarks.measure import PeakRss, free_port
from benchmarks.scratch import scratch_topics
from benchmarks.stats import WORKDIR, produce
from viewevents.kafka import user_key
from viewevents.v1 import recommender_service_pb2 as rpb
from viewevents.v1 import recommender_service_pb2_grpc as rpb_grpc
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


async def _stats_applied(channel: grpc.aio.Channel) -> int | None:
    """Events the stats service has applied (its position), or None when it did not answer (a
    busy service on a loaded machine may take seconds: the timeout is generous)."""
    try:
        reply = await pb_grpc.StatsServiceStub(channel).ListTopMedia(
            pb.ListTopMediaRequest(start_time={"seconds": 0}, end_time={"seconds": 60}, limit=1),
            timeout=30,
        )
    except grpc.aio.AioRpcError:
        return None
    return sum(p.offset for p in reply.position.partitions)


async def _recommender_applied(channel: grpc.aio.Channel) -> int | None:
    """The recommender's position, from a similar-items answer for the most popular item (an
    item it does not know yet answers NOT_FOUND: None, as for no answer)."""
    try:
        reply = await rpb_grpc.RecommenderServiceStub(channel).GetSimilarMedia(
            rpb.GetSimilarMediaRequest(media_id=1, limit=1), timeout=30
        )
    except grpc.aio.AioRpcError:
        return None
    return sum(p.offset for p in reply.position.partitions)


Applied = Callable[[grpc.aio.Channel], Awaitable[int | None]]
SERVICES: dict[str, tuple[str, Applied]] = {
    "stats": ("stats_service", _stats_applied),
    "recommender": ("recommender_service", _recommender_applied),
}


async def _sample(
    name: str,
    address: str,
    applied_of: Applied,
    process: subprocess.Popen,
    events: int,
    samples: int,
    out: list[dict[str, Any]],
) -> None:
    """Record (events applied, RSS, CPU seconds) each time the applied count crosses the next
    step, until every event is applied."""
    step = max(1, events // samples)
    target = step
    memory = psutil.Process(process.pid)
    started = time.perf_counter()
    async with grpc.aio.insecure_channel(address) as channel:
        while target <= events:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited during the stream")
            applied = await applied_of(channel) or 0
            if applied >= target:
                rss = memory.memory_info().rss / 2**20
                cpu = memory.cpu_times()
                out.append(
                    {
                        "applied": applied,
                        "rss_mb": round(rss, 1),
                        "cpu_s": round(cpu.user + cpu.system, 1),
                        "s": round(time.perf_counter() - started),
                    }
                )
                print(
                    f"  {name:<11} {applied:>12,} events applied  RSS {rss:7.1f} MiB  "
                    f"CPU {cpu.user + cpu.system:7.1f} s  load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                while target <= applied:
                    target += step
                continue
            await asyncio.sleep(0.5)


def _summary(events: int, out: list[dict[str, Any]], peak_mb: float) -> dict[str, Any]:
    """Peak, and flatness: the highest RSS in the second half of the stream against the highest
    in the first half (after the first sample, the warm-up)."""
    rss = [s["rss_mb"] for s in out]
    half = len(rss) // 2
    first, second = max(rss[1:half] or rss[:1] or [0.0]), max(rss[half:] or [0.0])
    cpu = out[-1]["cpu_s"] if out else 0.0
    return {
        "samples": out,
        "peak_rss_mb": round(peak_mb, 1),
        "max_rss_first_half_mb": first,
        "max_rss_second_half_mb": second,
        "second_half_growth": round(second / first - 1, 3) if first else None,
        "cpu_us_per_event": round(1e6 * cpu / events, 1),
    }


async def _run(config: settings.Config, events: int, samples: int) -> dict[str, Any]:
    processes: dict[str, subprocess.Popen] = {}
    peaks: dict[str, PeakRss] = {}
    logs: dict[str, str] = {}
    try:
        for name, (module, _) in SERVICES.items():
            log_path = WORKDIR / f"rss-stream-{name}-{uuid.uuid4().hex[:8]}.log"
            logs[name] = str(log_path)
            processes[name] = subprocess.Popen(
                [sys.executable, "-m", module],
                env=settings.to_environment(config),
                stdout=open(log_path, "ab"),
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parent.parent,
            )
            peaks[name] = PeakRss(processes[name].pid)
        out: dict[str, list[dict[str, Any]]] = {name: [] for name in SERVICES}
        sampling = [
            asyncio.create_task(
                _sample(
                    name,
                    getattr(config, f"{name}_address"),
                    applied_of,
                    processes[name],
                    events,
                    samples,
                    out[name],
                )
            )
            for name, (_, applied_of) in SERVICES.items()
        ]
        rate = await produce(config, stream_records(events), total=events)
        await asyncio.gather(*sampling)
        return {
            "events": events,
            "produced_events_per_s": round(rate),
            **{
                name: {**_summary(events, out[name], peaks[name].peak_mb()), "log": logs[name]}
                for name in SERVICES
            },
        }
    finally:
        for peak in peaks.values():
            peak.stop()
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def run_rss_stream(
    bootstrap: str, events: int, samples: int = 20, overrides: dict[str, str] | None = None
) -> dict[str, Any]:
    """Stream `events` through a fresh stats service and recommender (default settings but
    `overrides`); their RSS at `samples` even event counts."""
    run_id = uuid.uuid4().hex[:8]
    config = (
        settings.load(env={})
        .replace(
            kafka_bootstrap=bootstrap,
            view_topic=f"bench-rss-{run_id}",
            dead_letter_topic=f"bench-rss-dlq-{run_id}",
            stats_group=f"bench-rss-{run_id}",
            stats_address=f"127.0.0.1:{free_port()}",
            stats_state_dir=str(WORKDIR / f"rss-state-{run_id}"),
            stats_metrics_port=0,
            recommender_group=f"bench-rss-rec-{run_id}",
            recommender_address=f"127.0.0.1:{free_port()}",
            recommender_state_dir=str(WORKDIR / f"rss-state-rec-{run_id}"),
            recommender_metrics_port=0,
        )
        .replace(**(overrides or {}))
    )
    scratch_topics(bootstrap, config.view_topic, config.dead_letter_topic)
    print(
        f"streaming {events:,} events through the stats service and the recommender "
        f"(RSS every {events // samples:,}){'; settings ' + str(overrides) if overrides else ''}"
    )
    try:
        return asyncio.run(_run(config, events, samples))
    finally:
        for state in (config.stats_state_dir, config.recommender_state_dir):
            subprocess.run(["rm", "-rf", state], check=False)
