"""Scale-out benchmark: what a second stats or recommender instance buys, and what it costs.

    python -m benchmarks.scale [--events 2000000] [--partitions 8] [--parts consume,...]

Parts (all by default), each printed as a table:
  consume    one pre-filled topic (the stats bench's generated data, `--partitions` partitions),
             consumed from process start to caught up (every partition, answered through one
             instance) by 1 and by 2 instances, fresh state each, stats and recommender:
             events/s, each instance's CPU seconds, and the 2-vs-1 ratio
  latency    p50/p99 of every query RPC with `--clients` concurrent clients through one
             instance, with the data on that one instance and spread over 2 (run on the groups
             of `consume`)
  freshness  Publish ack to GetMediaStats showing the probe's media item, idle and while a
             `--upload-events` upload runs through the ingest service, with 1 and 2 stats
             instances (fresh topic each); the upload's events (`--upload-shapes`): "session",
             the generator's viewing sessions (the data of `consume`), and/or "uniform", the
             ingest bench's events spread evenly over 10k media x 200k users x 7 days (nearly
             every event a new media-hour and viewer-day: the stats consumer's worst case)
  failover   2 instances caught up (those of `consume`); kill -9 one; seconds until answers
             through the survivor are complete again (the session timeout, 10 s, then replay)
  takeover   2 stats instances on a 2-partition topic, one partition holding N events
             (`--takeover-sizes`); kill -9 its owner; seconds until the survivor serves it
             (replayed from the topic: no standby replicas)
The machine is shared, so every table comes with the load average and CPU seconds per instance.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from tqdm import tqdm

from benchmarks import ingest, stats
from benchmarks.measure import free_port
from benchmarks.scale_group import (
    NOT_YET,
    WORKDIR,
    Group,
    PositionProbe,
    recommender_position,
    replayed,
    stats_position,
    ts,
    until_complete,
)
from benchmarks.scratch import scratch_topics
from viewevents.kafka import KeyPartitioner
from viewevents.v1 import ingest_service_pb2 as ingest_pb
from viewevents.v1 import ingest_service_pb2_grpc as ingest_grpc
from viewevents.v1 import recommender_service_pb2 as rec_pb
from viewevents.v1 import recommender_service_pb2_grpc as rec_grpc
from viewevents.v1 import stats_service_pb2 as stats_pb
from viewevents.v1 import stats_service_pb2_grpc as stats_grpc
from viewevents.v1 import view_event_pb2 as ve
from viewevents_tools import settings_catalogue as settings
from viewevents_tools.processes import start_service, stop_service

PARTS = ("consume", "latency", "freshness", "failover", "takeover")
UPLOAD_SHAPES = ("session", "uniform")
SERVICES = ("stats", "recommender")
# The default of VIEWEVENTS_CONSUMER_SESSION_TIMEOUT_MS, which the bench's services keep.
SESSION_TIMEOUT_S = settings.load(env={}).consumer_session_timeout_ms / 1000
PROBE_MEDIA_BASE = 900_000_000  # probe media ids: far above any generated or uploaded one


@dataclass
class Options:
    """Sizes and switches (the command line's flags; defaults are the issue's sizes)."""

    events: int = 2_000_000
    partitions: int = 8
    clients: int = 8
    calls: int = 2_000
    upload_events: int = 2_000_000
    probe_interval_s: float = 0.1
    idle_probes: int = 60
    idle_poll_ms: float = 2.0
    load_poll_ms: float = 20.0
    takeover_sizes: tuple[int, ...] = (250_000, 500_000, 1_000_000)
    freshness_instances: tuple[int, ...] = (1, 2)
    # Ingest's bounded staleness in the freshness runs: 0 is off (Kafka absorbs the burst).
    freshness_max_lags: tuple[int, ...] = (0, 30_000)
    upload_shapes: tuple[str, ...] = ("session",)
    parts: tuple[str, ...] = PARTS
    services: tuple[str, ...] = SERVICES
    seed: int = 1


@dataclass
class Data:
    """The generated events as Kafka records, with what queries pick from."""

    records: list[tuple[bytes, bytes]]
    media: list[int]
    users: list[int]
    low: int
    high: int

    def ends(self, partitions: int) -> dict[int, int]:
        """Each partition's end offset once the records are produced to a fresh topic."""
        partitioner = KeyPartitioner(partitions)
        ends = dict.fromkeys(range(partitions), 0)
        for key, _ in self.records:
            ends[partitioner(key)] += 1
        return ends


@dataclass
class Table:
    """One printed table: a title, column names, rows, notes under it."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        cells = [[_cell(v) for v in row] for row in self.rows]
        widths = [
            max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(self.columns)
        ]
        line = "  ".join("-" * w for w in widths)
        out = [f"\n== {self.title} ==", "  ".join(c.ljust(w) for c, w in zip(self.columns, widths))]
        out.append(line)
        out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
        out += [f"  {note}" for note in self.notes]
        return "\n".join(out)

    def as_dict(self) -> dict[str, Any]:
        return {"columns": self.columns, "rows": self.rows, "notes": self.notes}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def load_average() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def prepare(options: Options) -> Data:
    records, media, low, high = stats.prepare_records(options.events, options.seed)
    users = sorted({int(key) for key, _ in records})
    return Data(records, media, users, low, high)


def base_config(bootstrap: str, partitions: int, tag: str) -> settings.Config:
    """Fresh topics and free addresses for one run; env={}: a developer's VIEWEVENTS_* variables
    must not point the bench at their stack."""
    run = uuid.uuid4().hex[:8]
    view_topic, dead_letter_topic = f"bench-scale-{tag}-{run}", f"bench-scale-{tag}-dlq-{run}"
    scratch_topics(bootstrap, view_topic, dead_letter_topic)
    return settings.load(env={}).replace(
        kafka_bootstrap=bootstrap,
        view_topic=view_topic,
        dead_letter_topic=dead_letter_topic,
        topic_partitions=partitions,
        ingest_address=f"127.0.0.1:{free_port()}",
        ingest_metrics_port=0,
        stats_page_token_secret=f"bench-{run}",
    )


def probe_for(service: str, data: Data) -> PositionProbe:
    return (stats_position if service == "stats" else recommender_position)(data.media[0])


# --- latency --------------------------------------------------------------------------------

Call = Callable[[random.Random], Awaitable[Any]]


def tolerant(call: Call, errors: list[int]) -> Call:
    """A call whose gRPC errors are counted (and timed) instead of ending the measurement."""

    async def wrapped(rng: random.Random) -> None:
        try:
            await call(rng)
        except grpc.aio.AioRpcError:
            errors[0] += 1

    return wrapped


def query_calls(service: str, channel: grpc.aio.Channel, data: Data) -> list[tuple[str, Call, int]]:
    """(RPC label, call, share of --calls) of every query RPC of the service."""
    if service == "stats":
        stub = stats_grpc.StatsServiceStub(channel)
        days = max(1, (data.high - data.low) // 86400)
        hot = data.media[: max(1, len(data.media) // 10)]

        async def media_stats(rng: random.Random) -> None:
            await stub.GetMediaStats(
                stats_pb.GetMediaStatsRequest(media_id=rng.choice(data.media)), timeout=30
            )

        async def trend(rng: random.Random) -> None:
            day = data.low - data.low % 86400 + 86400 * rng.randrange(days)
            await stub.GetMediaTrend(
                stats_pb.GetMediaTrendRequest(
                    media_id=rng.choice(hot),
                    start_time=ts(day),
                    end_time=ts(day + 86400),
                    granularity=stats_pb.GRANULARITY_MINUTE,
                ),
                timeout=30,
            )

        def top(metric: stats_pb.TopMediaMetric) -> Call:
            async def call(rng: random.Random) -> None:
                start = data.low + rng.randrange(max(1, data.high - data.low - 86400))
                await stub.ListTopMedia(
                    stats_pb.ListTopMediaRequest(
                        start_time=ts(start), end_time=ts(start + 86400), metric=metric, limit=10
                    ),
                    timeout=60,
                )

            return call

        return [
            ("GetMediaStats", media_stats, 1),
            ("GetMediaTrend (1 day of minutes)", trend, 4),
            ("ListTopMedia (24 h, view time)", top(stats_pb.TOP_MEDIA_METRIC_VIEW_TIME), 20),
            (
                "ListTopMedia (24 h, unique viewers)",
                top(stats_pb.TOP_MEDIA_METRIC_UNIQUE_VIEWERS),
                40,
            ),
        ]
    rec = rec_grpc.RecommenderServiceStub(channel)

    def similar(metric: rec_pb.SimilarityMetric) -> Call:
        async def call(rng: random.Random) -> None:
            await rec.GetSimilarMedia(
                rec_pb.GetSimilarMediaRequest(
                    media_id=rng.choice(data.media), limit=10, metric=metric
                ),
                timeout=30,
            )

        return call

    async def recommend(rng: random.Random) -> None:
        await rec.RecommendForUser(
            rec_pb.RecommendForUserRequest(user_id=rng.choice(data.users), limit=10), timeout=30
        )

    return [
        ("GetSimilarMedia (cosine)", similar(rec_pb.SIMILARITY_METRIC_COSINE), 5),
        ("GetSimilarMedia (Pearson)", similar(rec_pb.SIMILARITY_METRIC_PEARSON), 5),
        ("RecommendForUser", recommend, 5),
    ]


async def measure_latency(
    service: str, address: str, data: Data, options: Options
) -> dict[str, dict[str, float]]:
    """Per RPC: p50/p99 ms, calls/s and errors, with `options.clients` concurrent clients."""
    out: dict[str, dict[str, float]] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        for label, call, share in query_calls(service, channel, data):
            errors = [0]
            calls = max(options.clients, options.calls // share)
            result = await stats.latency(label, tolerant(call, errors), calls, options.clients)
            out[label] = {**result, "errors": errors[0]}
    return out


# --- consume, latency, failover: one group after the other -----------------------------------


async def run_group(
    service: str,
    config: settings.Config,
    count: int,
    data: Data,
    ends: dict[int, int],
    options: Options,
) -> dict[str, Any]:
    """Start `count` instances on the pre-filled topic; time catch-up; latency through
    instance 0; with 2 instances and `failover` selected, kill -9 instance 1 and time the
    survivor's way back to complete answers."""
    group = Group(service, config, count, f"x{count}")
    probe = probe_for(service, data)
    out: dict[str, Any] = {"instances": count}
    try:
        group.start()
        seconds = await group.wait_complete(
            ends, probe, config.kafka_bootstrap, desc=f"{service} x{count} consume"
        )
        out["seconds"] = seconds
        out["cpu_s"] = [i.cpu_seconds() for i in group.instances]
        if "latency" in options.parts:
            if service == "recommender":  # as benchmarks.recommender does
                # One instance warms its own lists; with two, each warms the lists it gathers
                # from both (after the offsets stood still for 2 s).
                warmed = r"cache warm for version" if count == 1 else r"fan-out cache warm for"
                await group.instances[0].wait_log(warmed, 180)
            out["latency"] = await measure_latency(
                service, group.instances[0].address, data, options
            )
        if "failover" in options.parts and count == 2:
            survivor, victim = group.instances
            victim.kill()
            left, complete = await until_complete(survivor, probe, ends)
            out["failover"] = {
                "left_serving_s": left,
                "complete_s": complete,
                "replayed": replayed(survivor, ends),
            }
    finally:
        group.close()
    return out


def consume_tables(
    results: dict[str, list[dict[str, Any]]], data: Data, options: Options
) -> list[Table]:
    events = len(data.records)
    tables: list[Table] = []
    if "consume" in options.parts:
        table = Table(
            f"consume {events:,} events, {options.partitions} partitions: process start to caught up",
            [
                "service",
                "instances",
                "seconds",
                "events/s",
                "CPU s per instance",
                "events per CPU s",
                "ratio to 1 instance",
            ],
        )
        for service, runs in results.items():
            single = runs[0]["seconds"] if runs else None
            for run in runs:
                cpu = run["cpu_s"]
                table.rows.append(
                    [
                        service,
                        run["instances"],
                        run["seconds"],
                        round(events / run["seconds"]),
                        " + ".join(f"{c:.1f}" for c in cpu),
                        round(events / sum(cpu)),
                        f"{single / run['seconds']:.2f}x" if single else None,
                    ]
                )
        table.notes.append(
            "events/s counts from the first process start; the group forms while consuming "
            "(the second member joins, partitions move once)"
        )
        tables.append(table)
    if "latency" in options.parts:
        table = Table(
            f"query latency, {options.clients} concurrent clients through one instance",
            [
                "service",
                "RPC",
                "1 instance p50/p99 ms",
                "2 instances p50/p99 ms",
                "calls/s 1 / 2",
                "errors 1 / 2",
            ],
        )
        for service, runs in results.items():
            by_count = {run["instances"]: run.get("latency", {}) for run in runs}
            one, two = by_count.get(1, {}), by_count.get(2, {})
            for label in one or two:
                a, b = one.get(label, {}), two.get(label, {})
                table.rows.append(
                    [
                        service,
                        label,
                        f"{a.get('p50_ms', '-')} / {a.get('p99_ms', '-')}",
                        f"{b.get('p50_ms', '-')} / {b.get('p99_ms', '-')}",
                        f"{a.get('calls_per_s', '-')} / {b.get('calls_per_s', '-')}",
                        f"{a.get('errors', '-')} / {b.get('errors', '-')}",
                    ]
                )
        table.notes.append(
            "2 instances: the asking instance owns half the partitions and asks the other"
        )
        tables.append(table)
    if "failover" in options.parts:
        table = Table(
            "failover: 2 instances caught up, kill -9 one, query through the survivor",
            ["service", "survivor saw the rebalance s", "complete answers again s", "replayed"],
        )
        for service, runs in results.items():
            for run in runs:
                if "failover" in run:
                    f = run["failover"]
                    table.rows.append(
                        [service, f["left_serving_s"], f["complete_s"], f["replayed"]]
                    )
        table.notes.append(
            f"session timeout {SESSION_TIMEOUT_S:g} s until the group drops "
            "the dead member; then the survivor replays the dead member's partitions from the "
            "topic (no standby) before it answers for them"
        )
        tables.append(table)
    return tables


# --- freshness --------------------------------------------------------------------------------


@dataclass
class Probe:
    """One published probe event: its media item, when its Publish was acknowledged, and the
    offsets (per partition, just past it) a consumer position must reach to include it."""

    media_id: int
    publish_s: float
    acked: float
    targets: dict[int, int]
    visible_s: float | None = None


async def publish_probe(ingest_stub: ingest_grpc.IngestServiceStub, number: int) -> Probe:
    """Publish one event of a media item nobody else uses."""
    media_id = PROBE_MEDIA_BASE + number
    event = ve.ViewEvent(
        event_id=f"probe-{uuid.uuid4().hex}",
        media_id=media_id,
        user_id=1 + number % 100_000,
        event_type=ve.EVENT_TYPE_STREAM_START,
        event_time=timestamp_pb2.Timestamp(seconds=int(time.time())),
    )
    began = time.perf_counter()
    reply = await ingest_stub.Publish(ingest_pb.PublishRequest(events=[event]), timeout=60)
    acked = time.perf_counter()
    if reply.accepted != 1:
        raise RuntimeError(f"probe {number} not accepted: {reply}")
    targets = {p.partition: p.offset for p in reply.positions}
    return Probe(media_id, acked - began, acked, targets)


async def shows(
    stats_stub: stats_grpc.StatsServiceStub, media_id: int
) -> ve.ConsumerPosition | None:
    """GetMediaStats of the item: its position once the item is there, else None."""
    try:
        reply = await stats_stub.GetMediaStats(
            stats_pb.GetMediaStatsRequest(media_id=media_id), timeout=10
        )
        return reply.position
    except grpc.aio.AioRpcError as error:
        if error.code() not in NOT_YET:
            raise
        return None


async def wait_visible(
    stats_stub: stats_grpc.StatsServiceStub, probe: Probe, poll_s: float, timeout: float = 120
) -> Probe:
    """Poll GetMediaStats of the probe's item until it answers (one probe at a time: idle)."""
    while time.perf_counter() - probe.acked < timeout:
        if await shows(stats_stub, probe.media_id) is not None:
            probe.visible_s = time.perf_counter() - probe.acked
            return probe
        await asyncio.sleep(poll_s)
    raise TimeoutError(f"probe of media {probe.media_id} not visible after {timeout} s")


async def watch(
    stats_stub: stats_grpc.StatsServiceStub,
    outstanding: list[Probe],
    anchor: int,
    poll_s: float,
    done: asyncio.Event,
    give_up_s: float = 900,
) -> None:
    """Under load, many probes wait at once; polling each would load the service being
    measured. So every `poll_s` one GetMediaStats of an item known to be there (`anchor`) reads
    the position, and each probe the position now includes is confirmed by GetMediaStats of
    its own item, which then counts it visible. A probe not visible `give_up_s` after its ack
    is dropped (counted as not visible)."""
    bar = tqdm(desc="probes visible", unit=" probes", leave=False)
    while not (done.is_set() and not outstanding):
        position = await shows(stats_stub, anchor)
        if position is not None:
            offsets = {p.partition: p.offset for p in position.partitions}
            for probe in list(outstanding):
                if all(offsets.get(p, -1) >= o for p, o in probe.targets.items()):
                    if await shows(stats_stub, probe.media_id) is not None:
                        probe.visible_s = time.perf_counter() - probe.acked
                        outstanding.remove(probe)
                        bar.update(1)
        for probe in list(outstanding):
            if time.perf_counter() - probe.acked > give_up_s:
                outstanding.remove(probe)
            bar.set_postfix(waiting=len(outstanding), refresh=False)
        await asyncio.sleep(poll_s)
    bar.close()


def summary(samples: Sequence[float]) -> dict[str, Any]:
    """n, p50, p99 (nearest rank: with fewer than 100 probes, the maximum) and max in ms."""
    ordered = sorted(samples)
    if not ordered:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "n": len(ordered),
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[math.ceil(0.99 * len(ordered)) - 1],
        "max_ms": 1000 * ordered[-1],
    }


async def freshness_run(
    bootstrap: str, count: int, requests: list[bytes], options: Options, max_lag: int = 0
) -> dict[str, Any]:
    """Ingest and `count` stats instances on a fresh topic: idle probes one after the other,
    then probes every `probe_interval_s` while the upload runs. With `max_lag`, ingest holds
    writes back while the stats group is more than that many records behind."""
    config = base_config(bootstrap, options.partitions, f"fresh{count}")
    group = Group("stats", config, count, f"fresh{count}")
    ingest_config = config
    if max_lag:  # the group the instances join (the Group names it)
        ingest_config = config.replace(
            ingest_lag_groups=group.group_id, ingest_max_lag_records=max_lag
        )
    ingest_process = start_service(
        "ingest_service",
        settings.to_environment(ingest_config),
        config.ingest_address,
        WORKDIR / f"scale-ingest-{config.view_topic}.log",
    )
    out: dict[str, Any] = {"instances": count, "max_lag": max_lag}
    try:
        group.start()
        ends = dict.fromkeys(range(options.partitions), 0)
        await group.wait_complete(ends, _any_position, bootstrap, desc=f"stats x{count} start")
        async with (
            grpc.aio.insecure_channel(config.ingest_address) as ingest_channel,
            grpc.aio.insecure_channel(group.instances[0].address) as stats_channel,
        ):
            ingest_stub = ingest_grpc.IngestServiceStub(ingest_channel)
            stats_stub = stats_grpc.StatsServiceStub(stats_channel)
            idle_poll, load_poll = options.idle_poll_ms / 1000, options.load_poll_ms / 1000
            anchor = await wait_visible(stats_stub, await publish_probe(ingest_stub, 0), idle_poll)
            idle: list[Probe] = []
            for number in tqdm(range(1, options.idle_probes + 1), desc="idle probes", leave=False):
                probe = await publish_probe(ingest_stub, number)
                idle.append(await wait_visible(stats_stub, probe, idle_poll))
            out["idle"] = _probe_summary(idle)
            cpu_before = [i.cpu_seconds() for i in group.instances]
            upload = asyncio.ensure_future(
                asyncio.to_thread(
                    ingest.upload_raw, config.ingest_address, requests, options.upload_events
                )
            )
            loaded: list[Probe] = []
            outstanding: list[Probe] = []
            done = asyncio.Event()
            watcher = asyncio.ensure_future(
                watch(stats_stub, outstanding, anchor.media_id, load_poll, done)
            )
            number = 10_000
            while not upload.done():
                number += 1
                probe = await publish_probe(ingest_stub, number)
                loaded.append(probe)
                outstanding.append(probe)
                await asyncio.sleep(options.probe_interval_s)
            upload_summary, upload_s = await upload
            done.set()
            await watcher
            out["upload"] = {
                "events": upload_summary.accepted,
                "seconds": upload_s,
                "cpu_s": [
                    c - b for c, b in zip((i.cpu_seconds() for i in group.instances), cpu_before)
                ],
            }
            out["load"] = _probe_summary(loaded)
    finally:
        group.close()
        stop_service(ingest_process)
    return out


async def _any_position(channel: grpc.aio.Channel) -> ve.ConsumerPosition:
    """The position of an empty topic's answer (the item is unknown, the position is not)."""
    reply = await stats_grpc.StatsServiceStub(channel).ListTopMedia(
        stats_pb.ListTopMediaRequest(start_time=ts(0), end_time=ts(60), limit=1), timeout=5
    )
    return reply.position


def _probe_summary(probes: Sequence[Probe]) -> dict[str, Any]:
    visible = [p.visible_s for p in probes if p.visible_s is not None]
    return {
        **summary(visible),
        "not_visible": len(probes) - len(visible),
        "publish_p50_ms": 1000 * statistics.median(p.publish_s for p in probes),
    }


def session_requests(records: Sequence[tuple[bytes, bytes]], batch_size: int) -> list[bytes]:
    """Serialized UploadRequests of the generated events (the consume part's data), built
    before timing starts, like `ingest.synthetic_requests`."""
    requests: list[bytes] = []
    for start in range(0, len(records), batch_size):
        events = [
            ve.ViewEvent.FromString(value) for _, value in records[start : start + batch_size]
        ]
        request = ingest_pb.UploadRequest(events=events, sequence=len(requests))
        requests.append(request.SerializeToString())
    return requests


def freshness_table(runs: list[dict[str, Any]], options: Options, shape: str) -> Table:
    table = Table(
        "freshness: Publish ack until GetMediaStats (through instance 0) shows the probe's item; "
        f"upload of {shape} events",
        [
            "stats instances",
            "ingest bound",
            "while",
            "probes (not visible)",
            "p50 ms",
            "p99 ms",
            "max ms",
            "Publish p50 ms",
            "target p99",
        ],
    )
    for run in runs:
        bound = f"{run['max_lag']:,} records" if run.get("max_lag") else "off"
        table.rows.append(
            [
                run["instances"],
                bound,
                "idle",
                f"{run['idle']['n']} ({run['idle']['not_visible']})",
                run["idle"]["p50_ms"],
                run["idle"]["p99_ms"],
                run["idle"]["max_ms"],
                run["idle"]["publish_p50_ms"],
                "50 ms",
            ]
        )
        upload = run["upload"]
        table.rows.append(
            [
                run["instances"],
                bound,
                f"upload of {upload['events']:,} ({upload['events'] / upload['seconds']:,.0f} ev/s; "
                f"stats CPU s {' + '.join(f'{c:.1f}' for c in upload['cpu_s'])})",
                f"{run['load']['n']} ({run['load']['not_visible']})",
                run["load"]["p50_ms"],
                run["load"]["p99_ms"],
                run["load"]["max_ms"],
                run["load"]["publish_p50_ms"],
                "1 s (2 instances)",
            ]
        )
    table.notes.append(
        f"idle: one probe at a time, its item polled every {options.idle_poll_ms} ms; under load: "
        f"a probe every {options.probe_interval_s} s (after the previous Publish returned), the "
        f"position read every {options.load_poll_ms} ms and each probe it includes confirmed by "
        "GetMediaStats of its item"
    )
    table.notes.append(
        "ingest bound: VIEWEVENTS_INGEST_MAX_LAG_RECORDS with VIEWEVENTS_INGEST_LAG_GROUPS = the "
        "stats group (off: Kafka absorbs the upload and the consumers catch up after it)"
    )
    return table


# --- takeover ---------------------------------------------------------------------------------


async def takeover_run(bootstrap: str, data: Data, size: int) -> dict[str, Any]:
    """2 stats instances on a 2-partition topic whose partition 1 holds `size` events (partition
    0 a tenth of that, at most 5,000); kill -9 partition 1's owner; time until the survivor serves it.

    The first instance consumes both partitions alone; the second joins after, and the
    state-aware assignor gives the newcomer the partition with least to replay (0), so the
    survivor has never read partition 1 and replays all of it."""
    partitioner = KeyPartitioner(2)
    small = [r for r in data.records if partitioner(r[0]) == 0][: max(1, min(5_000, size // 10))]
    big = [r for r in data.records if partitioner(r[0]) == 1][:size]
    config = base_config(bootstrap, 2, f"take{size // 1000}k")
    await stats.produce(config, small + big)
    ends = {0: len(small), 1: len(big)}
    known = ve.ViewEvent.FromString(big[0][1]).media_id
    probe = stats_position(known)
    group = Group("stats", config, 2, f"take{size // 1000}k")
    try:
        group.start(only=0)
        await group.wait_complete(ends, probe, bootstrap, desc=f"takeover {len(big):,} setup")
        group.start(only=1)
        await group.wait_complete(ends, probe, bootstrap, desc="second instance joins")
        owner = group.owner_of(1, known)
        survivor = next(i for i in group.instances if i is not owner)
        cpu_before = survivor.cpu_seconds()
        owner.kill()
        left, complete = await until_complete(survivor, probe, ends)
        return {
            "events": len(big),
            "replayed": replayed(survivor, {1: ends[1]}),
            "left_serving_s": left,
            "complete_s": complete,
            "survivor_cpu_s": survivor.cpu_seconds() - cpu_before,
        }
    finally:
        group.close()


def takeover_table(runs: list[dict[str, Any]]) -> Table:
    table = Table(
        "takeover: kill -9 the owner of a partition of N events; the survivor replays it",
        [
            "events in partition",
            "replayed",
            "survivor saw the rebalance s",
            "serving it s",
            "replay s",
            "replay events/s",
            "survivor CPU s",
        ],
    )
    for run in runs:
        replay = run["complete_s"] - (run["left_serving_s"] or 0)
        replayed = run["replayed"] if run["replayed"] is not None else run["events"]
        table.rows.append(
            [
                run["events"],
                run["replayed"],
                run["left_serving_s"],
                run["complete_s"],
                replay,
                round(replayed / replay) if replay > 0 else None,
                run["survivor_cpu_s"],
            ]
        )
    table.notes.append(
        f"kill to rebalance: the session timeout ({SESSION_TIMEOUT_S:g} s); replay s: from the "
        "rebalance to serving"
    )
    return table


# --- the whole section ------------------------------------------------------------------------


def run_bench(bootstrap: str, options: Options | None = None) -> dict[str, Any]:
    """Every selected part against the broker at `bootstrap`; prints the tables and returns
    them (with the load average around each part)."""
    options = options or Options()
    WORKDIR.mkdir(parents=True, exist_ok=True)
    tables: list[Table] = []

    def show(new: list[Table], began: str) -> None:
        for table in new:
            table.notes.append(f"{began} at the start, {load_average()} at the end")
            print(table.render())
            tables.append(table)
        sys.stdout.flush()

    if {"consume", "latency", "failover", "takeover"} & set(options.parts) or (
        "freshness" in options.parts and "session" in options.upload_shapes
    ):
        data = prepare(options)
    if {"consume", "latency", "failover"} & set(options.parts):
        began = load_average()
        config = base_config(bootstrap, options.partitions, "consume")
        rate = asyncio.run(stats.produce(config, data.records))
        print(f"prefilled {config.view_topic}: {len(data.records):,} events at {rate:,.0f}/s")
        ends = data.ends(options.partitions)
        results: dict[str, list[dict[str, Any]]] = {}
        for service in options.services:
            results[service] = [
                asyncio.run(run_group(service, config, count, data, ends, options))
                for count in (1, 2)
            ]
        show(consume_tables(results, data, options), began)
    if "freshness" in options.parts:
        for shape in options.upload_shapes:
            began = load_average()
            requests = (
                session_requests(data.records[: options.upload_events], 5_000)
                if shape == "session"
                else ingest.synthetic_requests(options.upload_events, 5_000, seed=options.seed)
            )
            runs = [
                asyncio.run(freshness_run(bootstrap, count, requests, options, max_lag))
                for max_lag in options.freshness_max_lags
                for count in options.freshness_instances
            ]
            show([freshness_table(runs, options, shape)], began)
    if "takeover" in options.parts:
        began = load_average()
        runs = [asyncio.run(takeover_run(bootstrap, data, size)) for size in options.takeover_sizes]
        show([takeover_table(runs)], began)
    return {table.title: table.as_dict() for table in tables}


def add_flags(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The section's flags (also on `python -m benchmarks`, there prefixed `--scale-`)."""
    d = Options()
    parser.add_argument(
        f"--{prefix}events", type=int, default=d.events, help=f"topic events ({d.events:,})"
    )
    parser.add_argument(
        f"--{prefix}partitions", type=int, default=d.partitions, help="topic partitions (8)"
    )
    parser.add_argument(
        f"--{prefix}clients", type=int, default=d.clients, help="concurrent query clients (8)"
    )
    parser.add_argument(
        f"--{prefix}calls",
        type=int,
        default=d.calls,
        help=f"GetMediaStats calls per run ({d.calls:,}); the slower RPCs get a fraction",
    )
    parser.add_argument(
        f"--{prefix}upload-events",
        type=int,
        default=d.upload_events,
        help="freshness upload (2,000,000)",
    )
    parser.add_argument(
        f"--{prefix}probe-interval",
        type=float,
        default=d.probe_interval_s,
        help="seconds between probes under load (0.1)",
    )
    parser.add_argument(
        f"--{prefix}idle-probes", type=int, default=d.idle_probes, help="probes without load (60)"
    )
    parser.add_argument(
        f"--{prefix}takeover-sizes",
        default=",".join(str(s) for s in d.takeover_sizes),
        help="events in the taken-over partition, comma-separated (250000,500000,1000000)",
    )
    parser.add_argument(
        f"--{prefix}freshness-instances",
        default=",".join(str(n) for n in d.freshness_instances),
        help="stats instances of the freshness runs, comma-separated (1,2)",
    )
    parser.add_argument(
        f"--{prefix}freshness-max-lags",
        default=",".join(str(n) for n in d.freshness_max_lags),
        help="ingest's bounded staleness in the freshness runs (records; 0: off), "
        "comma-separated (0,30000)",
    )
    parser.add_argument(
        f"--{prefix}upload-shapes",
        default=",".join(d.upload_shapes),
        help=f"events of the freshness upload, comma-separated subset of {','.join(UPLOAD_SHAPES)} "
        f"({','.join(d.upload_shapes)})",
    )
    parser.add_argument(
        f"--{prefix}parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)}",
    )
    parser.add_argument(
        f"--{prefix}services", default=",".join(SERVICES), help="stats,recommender (both)"
    )


def options_from(args: argparse.Namespace, prefix: str = "") -> Options:
    def get(name: str) -> Any:
        return getattr(args, (prefix + name).replace("-", "_"))

    parts = tuple(p for p in get("parts").split(",") if p)
    services = tuple(s for s in get("services").split(",") if s)
    shapes = tuple(s for s in get("upload-shapes").split(",") if s)
    unknown = (
        (set(parts) - set(PARTS))
        | (set(services) - set(SERVICES))
        | (set(shapes) - set(UPLOAD_SHAPES))
    )
    if unknown:
        raise SystemExit(f"unknown parts or services: {sorted(unknown)}")
    return Options(
        events=get("events"),
        partitions=get("partitions"),
        clients=get("clients"),
        calls=get("calls"),
        upload_events=get("upload-events"),
        probe_interval_s=get("probe-interval"),
        idle_probes=get("idle-probes"),
        takeover_sizes=tuple(int(s) for s in get("takeover-sizes").split(",") if s),
        freshness_instances=tuple(int(n) for n in get("freshness-instances").split(",") if n),
        freshness_max_lags=tuple(int(n) for n in get("freshness-max-lags").split(",") if n),
        upload_shapes=shapes,
        parts=parts,
        services=services,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(parser)
    settings.add_flags(parser, ["kafka_bootstrap"])
    args = parser.parse_args(argv)
    run_bench(settings.load(args).kafka_bootstrap, options_from(args))


if __name__ == "__main__":
    main()
