"""The ingest benchmark: a client-streaming upload acknowledged end to end, against Kafka's own
ProducerPerformance on the same broker (part of `make bench`, `python -m benchmarks`)."""

from __future__ import annotations

import random
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
from google.protobuf.timestamp_pb2 import Timestamp
from tqdm import tqdm

from benchmarks.measure import PeakRss
from benchmarks.scratch import scratch_topics
from viewevents.v1 import ingest_service_pb2 as ingest_pb
from viewevents.v1 import view_event_pb2 as ve
from viewevents_client.uploads import CHANNEL_OPTIONS
from viewevents_tools import settings_catalogue as settings
from viewevents_tools.processes import start_service, stop_service

REPO = Path(__file__).resolve().parent.parent


def synthetic_requests(events: int, batch_size: int, seed: int = 7) -> list[bytes]:
    """Serialized UploadRequests of distinct, valid events, built before timing starts so the
    measurement is of the service, not of the client building protobufs."""
    rng = random.Random(seed)
    now = int(time.time())
    requests: list[bytes] = []
    for start in tqdm(range(0, events, batch_size), desc="prepare", unit=" batches", leave=False):
        batch = [
            ve.ViewEvent(
                event_id=f"bench-{seed}-{n}",
                media_id=rng.randint(1, 10_000),
                user_id=rng.randint(1, 200_000),
                event_type=rng.choice(
                    (ve.EVENT_TYPE_STREAM_START,)
                    + (ve.EVENT_TYPE_WAYPOINT,) * 4
                    + (ve.EVENT_TYPE_STREAM_STOP, ve.EVENT_TYPE_STREAM_END)
                ),
                event_time=Timestamp(seconds=now - rng.randint(0, 7 * 86400)),
            )
            for n in range(start, min(start + batch_size, events))
        ]
        requests.append(
            ingest_pb.UploadRequest(events=batch, sequence=len(requests)).SerializeToString()
        )
    return requests


def average_event_bytes(requests: list[bytes]) -> int:
    sample = ingest_pb.UploadRequest.FromString(requests[0])
    return round(sum(e.ByteSize() for e in sample.events) / len(sample.events))


def upload_raw(
    address: str, requests: list[bytes], events: int, repeat: int = 1
) -> tuple[ingest_pb.UploadSummary, float]:
    """Client-streaming Upload of pre-serialized requests; seconds until the summary arrived."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        call = channel.stream_unary(
            "/viewevents.v1.IngestService/Upload",
            request_serializer=lambda raw: raw,
            response_deserializer=ingest_pb.UploadSummary.FromString,
        )
        bar = tqdm(
            total=events * repeat, unit=" events", unit_scale=True, desc="upload", smoothing=0.1
        )
        per_request = events // len(requests) if requests else 0

        def stream() -> Iterator[bytes]:
            for _ in range(repeat):
                for raw in requests:
                    yield raw
                    bar.update(per_request)

        started = time.perf_counter()
        summary = call(stream())
        elapsed = time.perf_counter() - started
        bar.close()
    return summary, elapsed


def producer_performance(
    bootstrap: str, topic: str, records: int, record_size: int
) -> dict[str, Any]:
    """Kafka's own ProducerPerformance tool, same broker, idempotent, acks=all."""
    libs = subprocess.run(
        [str(REPO / "deploy" / "kafka.sh"), "classpath"], check=True, capture_output=True, text=True
    ).stdout.strip()
    command = [
        "java",
        "-Xmx512m",
        "-cp",
        libs,
        "org.apache.kafka.tools.ProducerPerformance",
        "--topic",
        topic,
        "--num-records",
        str(records),
        "--record-size",
        str(record_size),
        "--throughput",
        "-1",
        "--producer-props",
        f"bootstrap.servers={bootstrap}",
        "acks=all",
        "enable.idempotence=true",
        "linger.ms=5",
        "batch.size=524288",
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    final = [line for line in output.splitlines() if "records sent" in line][-1]
    rate = float(re.search(r"([\d.]+) records/sec", final).group(1))  # type: ignore[union-attr]
    return {"records_per_s": rate, "summary": final.strip()}


def _cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU time of the service so far: its cost per event, whatever the load."""
    times = process.cpu_times()
    return float(times.user + times.system)


def bench_ingest(
    config: settings.Config, events: int, batch_size: int, workdir: Path
) -> dict[str, Any]:
    import asyncio

    from viewevents.kafka import ensure_topics

    stamp = int(time.time())
    config = config.replace(
        view_topic=f"bench-view-{stamp}", dead_letter_topic=f"bench-dlq-{stamp}"
    )
    scratch_topics(config.kafka_bootstrap, config.view_topic, config.dead_letter_topic)
    asyncio.run(ensure_topics(config, [config.view_topic, config.dead_letter_topic]))
    requests = synthetic_requests(min(events, 1_000_000), batch_size)
    repeat = max(1, events // 1_000_000)
    size = average_event_bytes(requests)
    service = start_service(
        "ingest_service",
        settings.to_environment(config),
        config.ingest_address,
        workdir / "ingest.log",
    )
    rss = PeakRss(service.pid)
    cpu_before = _cpu_seconds(rss.process)
    try:
        summary, elapsed = upload_raw(
            config.ingest_address, requests, min(events, 1_000_000), repeat
        )
        cpu = _cpu_seconds(rss.process) - cpu_before
    finally:
        peak = rss.stop()
        stop_service(service)
    total = min(events, 1_000_000) * repeat
    assert summary.accepted == total, f"accepted {summary.accepted} of {total}"
    ours = total / elapsed
    perf_topic = f"bench-perf-{stamp}"
    scratch_topics(config.kafka_bootstrap, perf_topic)
    asyncio.run(ensure_topics(config, [perf_topic]))
    kafka = producer_performance(config.kafka_bootstrap, perf_topic, total, size)
    return {
        "events": total,
        "event_bytes": size,
        "seconds": round(elapsed, 2),
        "upload_events_per_s": round(ours),
        "service_peak_rss_mb": round(peak, 1),
        "service_cpu_us_per_event": round(cpu / total * 1e6, 2),
        "kafka_producer_perf_records_per_s": round(kafka["records_per_s"]),
        "ratio_upload_to_kafka_perf": round(ours / kafka["records_per_s"], 3),
        "kafka_perf_summary": kafka["summary"],
    }
