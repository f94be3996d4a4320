"""Stats service benchmark: consumer throughput from a pre-filled topic, then query latency.

    python -m benchmarks.stats [--events 2000000] [--days 35] [--kafka-bootstrap HOST:PORT]

Steps: generate a noisy data set with viewevents_tools.generator (cached under .data/bench), keep the events
the ingest service would accept, produce them straight to a fresh topic with aiokafka (keyed by
user, as the ingest service does), start the stats service as a subprocess on a fresh state
directory, and time it from process start to caught-up. Then wait for the service to warm its
ranking rollups (its log line is reported) and measure p50/p99 of each RPC with
concurrent asyncio clients, and the service's peak RSS over the whole run. The machine is shared
with whatever else runs, so the consumer's CPU time is reported next to wall time. Rankings are
timed over 1, 7 and 30 days after one untimed 30-day call per metric (its time is reported as
the first call; before the service warmed its rollups, it built them); each timed ranking asks a range (whole minutes) not
asked before in the run, so no page kept for the current offsets can answer it. Then the same
with ghz (a Go client: little client CPU next to the service on a shared machine; rows marked
"ghz, Go client"), and one range asked again and again ("one range repeated": the page kept
for the current offsets answers). State on disk is reported in bytes per event after the
service stopped and the store was flushed and compacted.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sized
from pathlib import Path
from typing import Any, cast

import grpc
from aiokafka import AIOKafkaProducer
from google.protobuf import json_format, timestamp_pb2
from tqdm import tqdm

from benchmarks import grpc_floor
from benchmarks.measure import (
    PeakRss,
    cpu_seconds,
    free_port,
    ghz_latency,
    log_match,
    mib_and_mb,
    wait_log,
)
from benchmarks.scratch import scratch_topics
from ingest_service.validation import Limits, validate_event
from viewevents.kafka import VIEW_EVENT_HEADERS, KeyPartitioner, ensure_topics, user_key
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import stats_service_pb2_grpc as pb_grpc
from viewevents_tools import settings_catalogue as settings

REPO = Path(__file__).resolve().parent.parent
STATS_PROTO = "viewevents/v1/stats_service.proto"
WORKDIR = REPO / ".data" / "bench"


def prepare_records(
    events: int, seed: int, days: float = 35
) -> tuple[list[tuple[bytes, bytes]], list[int], int, int]:
    """(key, value) records of the valid events of a generated file, the media ids seen, and
    the event-time span; built before any timing starts."""
    from viewevents_client.event_files import iter_file
    from viewevents_tools.generator import generate

    WORKDIR.mkdir(parents=True, exist_ok=True)
    path = WORKDIR / (
        f"stats-{events}-{seed}.jsonl" if days == 7 else f"stats-{events}-{seed}-{days:g}d.jsonl"
    )
    if not path.exists():
        print(f"generating {events:,} lines over {days:g} days into {path}", flush=True)
        generate(str(path), events, seed=seed, days=days, progress=False)
    limits = Limits()
    now = time.time()
    records: list[tuple[bytes, bytes]] = []
    media: set[int] = set()
    low, high = 2**62, -(2**62)
    for _, parsed in tqdm(
        iter_file(str(path)),
        total=events,
        desc="parse",
        unit=" lines",
        unit_scale=True,
        leave=False,
    ):
        event = parsed.event
        if event is None or validate_event(event, now, limits):
            continue
        records.append((user_key(event.user_id), event.SerializeToString()))
        media.add(event.media_id)
        low = min(low, event.event_time.seconds)
        high = max(high, event.event_time.seconds)
    return records, sorted(media), low, high


async def produce(
    config: settings.Config, records: Iterable[tuple[bytes, bytes]], total: int | None = None
) -> float:
    """Write the records in large per-partition batches; returns records/s. `records` may be
    a generator (then give `total`), so a long stream need not be held in memory."""
    await ensure_topics(config, [config.view_topic, config.dead_letter_topic])
    producer = AIOKafkaProducer(
        bootstrap_servers=config.kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        max_batch_size=1 << 20,
        max_request_size=4 << 20,
        linger_ms=20,
    )
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(config.view_topic))
        partitioner = KeyPartitioner(len(partitions))
        batches = {p: producer.create_batch() for p in partitions}
        pending: list[asyncio.Future] = []
        started = time.perf_counter()
        count = total if total is not None else len(cast(Sized, records))
        bar = tqdm(total=count, desc="prefill", unit=" events", unit_scale=True)
        for key, value in records:
            partition = partitioner(key)
            batch = batches[partition]
            if (
                batch.append(key=key, value=value, timestamp=None, headers=VIEW_EVENT_HEADERS)
                is None
            ):
                pending.append(
                    await producer.send_batch(batch, config.view_topic, partition=partition)
                )
                bar.update(batch.record_count())
                batch = batches[partition] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None, headers=VIEW_EVENT_HEADERS)
                if len(pending) > 64:
                    await asyncio.gather(*pending)
                    pending.clear()
        for partition, batch in batches.items():
            if batch.record_count():
                pending.append(
                    await producer.send_batch(batch, config.view_topic, partition=partition)
                )
                bar.update(batch.record_count())
        await asyncio.gather(*pending)
        bar.close()
        return count / (time.perf_counter() - started)
    finally:
        await producer.stop()


async def _position(stub: pb_grpc.StatsServiceStub) -> pb.ListTopMediaResponse | None:
    try:
        return await stub.ListTopMedia(
            pb.ListTopMediaRequest(
                start_time=timestamp_pb2.Timestamp(seconds=0),
                end_time=timestamp_pb2.Timestamp(seconds=60),
                limit=1,
            ),
            timeout=5,
        )
    except grpc.aio.AioRpcError:
        return None


async def wait_caught_up(
    stub: pb_grpc.StatsServiceStub, total: int, process: subprocess.Popen
) -> float:
    """Seconds from now until the service reports caught_up, with a progress bar of the
    records it has applied."""
    started = time.perf_counter()
    bar = tqdm(total=total, desc="stats consume", unit=" events", unit_scale=True)
    while True:
        if process.poll() is not None:
            raise RuntimeError("stats service exited during catch-up")
        reply = await _position(stub)
        if reply is not None:
            applied = sum(p.offset for p in reply.position.partitions)
            bar.update(applied - bar.n)
            if reply.position.caught_up:
                bar.close()
                return time.perf_counter() - started
        await asyncio.sleep(0.1)


async def latency(
    name: str, call: Callable[[random.Random], Awaitable[Any]], calls: int, concurrency: int
) -> dict[str, float]:
    """p50/p99 (ms) and throughput of `calls` calls made by `concurrency` async clients."""
    samples: list[float] = []
    per_client = calls // concurrency
    bar = tqdm(total=per_client * concurrency, desc=name, unit=" calls", leave=False)

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(per_client):
            began = time.perf_counter()
            await call(rng)
            samples.append(time.perf_counter() - began)
            bar.update(1)

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    bar.close()
    samples.sort()
    return {
        "p50_ms": round(1000 * statistics.median(samples), 2),
        "p99_ms": round(1000 * samples[int(0.99 * (len(samples) - 1))], 2),
        "calls_per_s": round(len(samples) / elapsed),
    }


def _applied_from_log(log_path: Path) -> tuple[int, float] | None:
    """The consumer's own count: 'caught up: N records applied in S s'."""
    found = log_match(log_path, r"caught up[^:\n]*: (\d+) records applied in ([\d.]+) s")
    return (int(found.group(1)), float(found.group(2))) if found else None


async def _bench(
    config: settings.Config,
    records: list[tuple[bytes, bytes]],
    media: list[int],
    low: int,
    high: int,
    calls: int,
    concurrency: int,
) -> dict[str, Any]:
    result: dict[str, Any] = {"events_in_topic": len(records), "media_items": len(media)}
    result["prefill_events_per_s"] = round(await produce(config, records))
    log_path = WORKDIR / f"stats-service-{uuid.uuid4().hex[:8]}.log"

    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "stats_service"],
        env=settings.to_environment(config),
        stdout=open(log_path, "ab"),
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    rss = PeakRss(process.pid)
    try:
        async with grpc.aio.insecure_channel(config.stats_address) as channel:
            stub = pb_grpc.StatsServiceStub(channel)
            while await _position(stub) is None:
                if process.poll() is not None:
                    raise RuntimeError(f"stats service exited; see {log_path}")
                await asyncio.sleep(0.05)
            # The service answers queries only once caught up (UNAVAILABLE before), so the first
            # answer usually already says caught up: the consuming rate then comes from the
            # consumer's own log line, and the CPU counted is the process's since its start.
            catch_up = await wait_caught_up(stub, len(records), process)
            cpu = cpu_seconds(process.pid)
            total = time.perf_counter() - started
            result["start_to_caught_up_s"] = round(total, 1)
            result["events_per_s_start_to_caught_up"] = round(len(records) / total)
            own = _applied_from_log(log_path)
            if own:
                result["consumer_log"] = f"{own[0]:,} applied in {own[1]} s"
            consuming_s = own[1] if own and own[1] > 0 else catch_up
            # The service loads its ranking rollups once caught up: the queries below are timed
            # after that, as a service that has been up for more than a few seconds answers.
            # (Not logged within 2 minutes: rollups off, or an old version of the service.)
            warmed = await wait_log(
                log_path, r"rollups warm for partitions [\d,]+: (.*)", 120, process
            )
            if warmed:
                result["rollup_warm_up"] = warmed.group(1)
            if consuming_s > 0:
                result["events_per_s_consuming"] = round(len(records) / consuming_s)
            result["events_per_cpu_s_start_to_caught_up"] = round(len(records) / cpu)
            ts = timestamp_pb2.Timestamp
            hot = media[: max(1, len(media) // 10)]
            days = max(1, (high - low) // 86400)

            async def stats_call(rng: random.Random) -> None:
                await stub.GetMediaStats(pb.GetMediaStatsRequest(media_id=rng.choice(media)))

            async def trend_call(rng: random.Random) -> None:
                day = low - low % 86400 + 86400 * rng.randrange(days)
                await stub.GetMediaTrend(
                    pb.GetMediaTrendRequest(
                        media_id=rng.choice(hot),
                        start_time=ts(seconds=day),
                        end_time=ts(seconds=day + 86400),
                        granularity=pb.GRANULARITY_MINUTE,
                    )
                )

            def top_request(metric: pb.TopMediaMetric, start: int, span: int) -> Any:
                return pb.ListTopMediaRequest(
                    start_time=ts(seconds=start),
                    end_time=ts(seconds=start + span),
                    metric=metric,
                    limit=10,
                )

            asked: set[int] = set()

            def new_start(rng: random.Random, span: int) -> int:
                """A whole minute, `span` s before the data's end, never asked before in this
                run (so no kept page can answer its ranking)."""
                minutes = max(1, (high - low - span) // 60)
                for _ in range(1000):
                    start = low - low % 60 + 60 * rng.randrange(minutes)
                    if start not in asked:
                        asked.add(start)
                        return start
                raise RuntimeError(
                    f"no {span // 86400}-day range left that was not asked before: the data "
                    "spans too few minutes for the calls; generate more days (--stats-days)"
                )

            def top_call(
                metric: pb.TopMediaMetric,
                span_days: int = 1,
                repeated: bool = False,
                sliding: bool = False,
            ) -> Callable[[random.Random], Awaitable[None]]:
                """Distinct ranges (`new_start`), or with `repeated` one range asked again and
                again, or with `sliding` a window a minute later at each call (a dashboard's
                "last 24 hours" refreshed every minute: a new range each time, never a kept
                page, but sharing most of its hours with the one before)."""
                span = 86400 * span_days
                ticks = itertools.count()
                origin = max(low, high - span - 60 * calls) // 60 * 60

                async def call(rng: random.Random) -> None:
                    if repeated:
                        start = low - low % 60 + 60 * (max(1, (high - low - span) // 60) // 2)
                    elif sliding:
                        start = origin + 60 * next(ticks)
                        while start in asked:
                            start = origin + 60 * next(ticks)
                        asked.add(start)
                    else:
                        start = new_start(rng, span)
                    await stub.ListTopMedia(top_request(metric, start, span))

                return call

            # Rankings over spans shorter than the data (the default 35 days covers all three).
            spans = [d for d in (1, 7, 30) if 86400 * d < high - low]

            metrics = {
                "view time": pb.TOP_MEDIA_METRIC_VIEW_TIME,
                "unique viewers": pb.TOP_MEDIA_METRIC_UNIQUE_VIEWERS,
            }

            stats_cpu = cpu_seconds(process.pid)
            result["GetMediaStats"] = await latency("GetMediaStats", stats_call, calls, concurrency)
            result["GetMediaStats"]["service_cpu_ms_per_call"] = round(
                1000 * (cpu_seconds(process.pid) - stats_cpu) / calls, 3
            )
            ghz_rng = random.Random(99)
            result["GetMediaStats (ghz, Go client)"] = ghz_latency(
                config.stats_address,
                "viewevents.v1.StatsService/GetMediaStats",
                STATS_PROTO,
                [{"mediaId": str(ghz_rng.choice(media))} for _ in range(calls)],
                concurrency,
                process.pid,
            )
            result["GetMediaStats floor: empty handler, bare grpc.aio (ghz, Go client)"] = (
                grpc_floor.measure(
                    [{"mediaId": str(ghz_rng.choice(media))} for _ in range(calls)], concurrency
                )
            )
            result["GetMediaTrend (1 day, minutes)"] = await latency(
                "GetMediaTrend", trend_call, calls // 4, concurrency
            )
            for label, metric in metrics.items() if spans else ():  # untimed; none if no span
                cold_cpu = cpu_seconds(process.pid)
                began = time.perf_counter()
                await top_call(metric, spans[-1])(random.Random(0))
                result[f"ListTopMedia first call ({spans[-1]} days, {label})"] = (
                    f"{1000 * (time.perf_counter() - began):.0f} ms wall, "
                    f"{cpu_seconds(process.pid) - cold_cpu:.2f} CPU s"
                )

            async def timed_top(
                name: str, call: Callable[[random.Random], Awaitable[None]], count: int, digits: int
            ) -> dict[str, Any]:
                """`latency` of `count` rankings, with the service's CPU per call."""
                top_cpu = cpu_seconds(process.pid)
                timed = await latency(name, call, count, concurrency)
                timed["service_cpu_ms_per_call"] = round(
                    1000 * (cpu_seconds(process.pid) - top_cpu) / count, digits
                )
                return timed

            def top_count(label: str) -> int:
                """Rankings per series: fewer by unique viewers, the slower metric."""
                return calls // 20 if label == "view time" else calls // 40

            for span_days in spans:
                for label, metric in metrics.items():
                    count = top_count(label)
                    result[f"ListTopMedia ({span_days} day, {label})"] = await timed_top(
                        f"ListTopMedia {span_days} d {label}", top_call(metric, span_days), count, 2
                    )
            for label, metric in metrics.items() if 1 in spans else ():
                count = top_count(label)
                result[f"ListTopMedia (1 day, {label}; sliding by a minute)"] = await timed_top(
                    f"ListTopMedia 1 d {label} sliding", top_call(metric, 1, sliding=True), count, 2
                )
            # The same rankings with the Go client (distinct ranges, as above), and one range
            # asked again and again: answered from the page kept for the current offsets.
            for span_days in spans:
                for label, metric in metrics.items():
                    count = top_count(label)
                    span = 86400 * span_days
                    starts = [new_start(ghz_rng, span) for _ in range(count)]
                    result[f"ListTopMedia ({span_days} day, {label}; ghz, Go client)"] = (
                        ghz_latency(
                            config.stats_address,
                            "viewevents.v1.StatsService/ListTopMedia",
                            STATS_PROTO,
                            [
                                json_format.MessageToDict(top_request(metric, start, span))
                                for start in starts
                            ],
                            concurrency,
                            process.pid,
                        )
                    )
                    result[
                        f"ListTopMedia ({span_days} day, {label}; one range repeated)"
                    ] = await timed_top(
                        f"ListTopMedia {span_days} d {label} repeated",
                        top_call(metric, span_days, repeated=True),
                        count * 4,
                        3,
                    )
        result["peak_rss"] = mib_and_mb(rss.peak_mb())
        result["service_log"] = str(log_path)
    finally:
        rss.stop()
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    result.update(state_on_disk(Path(config.stats_state_dir), len(records)))
    return result


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def state_on_disk(state: Path, events: int) -> dict[str, Any]:
    """The state directory's size per event: as the stopped service left it, and after a flush
    and a full compaction (what the data itself costs, without WAL and not yet compacted
    files)."""
    from rocksdict import Rdict

    out: dict[str, Any] = {"state_dir_mb": round(_dir_bytes(state) / 2**20)}
    db = Rdict(str(state))
    try:
        db.flush()
        db.compact_range(None, None)
    finally:
        db.close()
    compacted = _dir_bytes(state)
    out["state_dir_mb_compacted"] = round(compacted / 2**20)
    out["state_bytes_per_event_compacted"] = round(compacted / max(1, events), 1)
    return out


def run_bench(
    bootstrap: str,
    events: int = 2_000_000,
    *,
    calls: int = 4_000,
    concurrency: int = 8,
    seed: int = 1,
    days: float = 35,
) -> dict[str, Any]:
    """Run the whole benchmark against the broker at `bootstrap`; returns the measurements."""
    records, media, low, high = prepare_records(events, seed, days)
    run_id = uuid.uuid4().hex[:8]
    base = settings.load(env={})
    overrides: dict[str, Any] = dict(
        kafka_bootstrap=bootstrap,
        view_topic=f"bench-stats-{run_id}",
        dead_letter_topic=f"bench-stats-dlq-{run_id}",
        stats_group=f"bench-stats-{run_id}",
        stats_address=f"127.0.0.1:{free_port()}",
        stats_state_dir=str(WORKDIR / f"stats-state-{run_id}"),
    )
    if hasattr(base, "stats_metrics_port"):
        overrides["stats_metrics_port"] = 0
    config = base.replace(**overrides)
    scratch_topics(bootstrap, config.view_topic, config.dead_letter_topic)
    try:
        result = asyncio.run(_bench(config, records, media, low, high, calls, concurrency))
    finally:
        subprocess.run(["rm", "-rf", config.stats_state_dir], check=False)
    print_table(result)
    return result


def print_table(result: dict[str, Any]) -> None:
    print("\nstats service benchmark")
    for key, value in result.items():
        if isinstance(value, dict):
            shown = "  ".join(f"{k}={v}" for k, v in value.items())
        else:
            shown = f"{value:,}" if isinstance(value, int) else str(value)
        print(f"  {key:<40} {shown}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks.stats",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--calls", type=int, default=4_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--days", type=float, default=35, help="days of event time the events span (35)"
    )
    settings.add_flags(parser, ["kafka_bootstrap"])
    args = parser.parse_args(argv)
    config = settings.load(args)
    run_bench(
        config.kafka_bootstrap,
        args.events,
        calls=args.calls,
        concurrency=args.concurrency,
        days=args.days,
    )


if __name__ == "__main__":
    main()
