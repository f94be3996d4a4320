"""`make bench`: throughput and latency of the running product, on the local broker.

Not a test: it prints measurements of one run. Sections: ingest (client-streaming upload,
acknowledged end to end, against Kafka's own ProducerPerformance on the same broker), and the
stats and recommender consumers and queries.

    python -m viewevents.bench [--events N] [--only ingest|stats|recommender] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
from google.protobuf.timestamp_pb2 import Timestamp
from tqdm import tqdm

from viewevents import config as settings
from viewevents.client import CHANNEL_OPTIONS
from viewevents.v1 import ingest_service_pb2 as ingest_pb
from viewevents.v1 import view_event_pb2 as ve

REPO = Path(__file__).resolve().parent.parent


class PeakRss:
    """Samples a process's resident memory in the background; `peak_mb` is the maximum seen."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.process = psutil.Process(pid)
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            try:
                self.peak_bytes = max(self.peak_bytes, self.process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_bytes / 2**20


def start_service(module: str, config: settings.Config, address: str, log_path: Path) -> subprocess.Popen:
    """Start `python -m module` and wait until its health check says SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    log = open(log_path, "ab")
    process = subprocess.Popen([sys.executable, "-m", module], env=settings.to_environment(config),
                               stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(1200):
            if process.poll() is not None:
                raise RuntimeError(f"{module} exited; see {log_path}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return process
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{module} did not become SERVING; see {log_path}")


def stop_service(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def synthetic_requests(events: int, batch_size: int, seed: int = 7) -> list[bytes]:
    """Serialized UploadRequests of distinct, valid events, built before timing starts so the
    measurement is of the service, not of the client building protobufs."""
    rng = random.Random(seed)
    now = int(time.time())
    requests: list[bytes] = []
    for start in tqdm(range(0, events, batch_size), desc="prepare", unit=" batches", leave=False):
        batch = [
            ve.ViewEvent(event_id=f"bench-{seed}-{n}", media_id=rng.randint(1, 10_000),
                         user_id=rng.randint(1, 200_000), event_type=rng.choice((1, 2, 2, 2, 2, 3, 4)),
                         event_time=Timestamp(seconds=now - rng.randint(0, 7 * 86400)))
            for n in range(start, min(start + batch_size, events))
        ]
        requests.append(ingest_pb.UploadRequest(events=batch, sequence=len(requests)).SerializeToString())
    return requests


def average_event_bytes(requests: list[bytes]) -> int:
    sample = ingest_pb.UploadRequest.FromString(requests[0])
    return round(sum(e.ByteSize() for e in sample.events) / len(sample.events))


def upload_raw(address: str, requests: list[bytes], events: int, repeat: int = 1) -> tuple[ingest_pb.UploadSummary, float]:
    """Client-streaming Upload of pre-serialized requests; seconds until the summary arrived."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        call = channel.stream_unary("/viewevents.v1.IngestService/Upload",
                                    request_serializer=lambda raw: raw,
                                    response_deserializer=ingest_pb.UploadSummary.FromString)
        bar = tqdm(total=events * repeat, unit=" events", unit_scale=True, desc="upload", smoothing=0.1)
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


def producer_performance(bootstrap: str, topic: str, records: int, record_size: int) -> dict[str, Any]:
    """Kafka's own ProducerPerformance tool, same broker, idempotent, acks=all."""
    libs = subprocess.run([str(REPO / "deploy" / "kafka.sh"), "classpath"], check=True,
                          capture_output=True, text=True).stdout.strip()
    command = [
        "java", "-Xmx512m", "-cp", libs, "org.apache.kafka.tools.ProducerPerformance",
        "--topic", topic, "--num-records", str(records), "--record-size", str(record_size),
        "--throughput", "-1", "--producer-props", f"bootstrap.servers={bootstrap}", "acks=all",
        "enable.idempotence=true", "linger.ms=5", "batch.size=524288",
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    final = [line for line in output.splitlines() if "records sent" in line][-1]
    rate = float(re.search(r"([\d.]+) records/sec", final).group(1))  # type: ignore[union-attr]
    return {"records_per_s": rate, "summary": final.strip()}


def bench_ingest(config: settings.Config, events: int, batch_size: int, workdir: Path) -> dict[str, Any]:
    import asyncio

    from viewevents.kafka import ensure_topics

    stamp = int(time.time())
    config = config.replace(view_topic=f"bench-view-{stamp}", dead_letter_topic=f"bench-dlq-{stamp}")
    asyncio.run(ensure_topics(config, [config.view_topic, config.dead_letter_topic]))
    requests = synthetic_requests(min(events, 1_000_000), batch_size)
    repeat = max(1, events // 1_000_000)
    size = average_event_bytes(requests)
    service = start_service("ingest_service", config, config.ingest_address, workdir / "ingest.log")
    rss = PeakRss(service.pid)
    try:
        summary, elapsed = upload_raw(config.ingest_address, requests, min(events, 1_000_000), repeat)
    finally:
        peak = rss.stop()
        stop_service(service)
    total = min(events, 1_000_000) * repeat
    assert summary.accepted == total, f"accepted {summary.accepted} of {total}"
    ours = total / elapsed
    perf_topic = f"bench-perf-{stamp}"
    asyncio.run(ensure_topics(config, [perf_topic]))
    kafka = producer_performance(config.kafka_bootstrap, perf_topic, total, size)
    return {
        "events": total, "event_bytes": size, "seconds": round(elapsed, 2),
        "upload_events_per_s": round(ours), "service_peak_rss_mb": round(peak, 1),
        "kafka_producer_perf_records_per_s": round(kafka["records_per_s"]),
        "ratio_upload_to_kafka_perf": round(ours / kafka["records_per_s"], 3),
        "kafka_perf_summary": kafka["summary"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="viewevents.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="events for the ingest upload")
    parser.add_argument("--stats-events", type=int, default=2_000_000)
    parser.add_argument("--recommender-events", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=5_000)
    parser.add_argument("--only", choices=["ingest", "stats", "recommender"], action="append")
    parser.add_argument("--json", help="also write the results to this file")
    settings.add_flags(parser, ["kafka_bootstrap"])
    args = parser.parse_args(argv)
    config = settings.load(args)
    workdir = REPO / ".data" / "bench"
    workdir.mkdir(parents=True, exist_ok=True)
    only = set(args.only or ["ingest", "stats", "recommender"])
    results: dict[str, Any] = {}
    if "ingest" in only:
        from viewevents.grpc_server import new_server  # noqa: F401 - fail early if stubs missing
        results["ingest"] = bench_ingest(config, args.events, args.batch_size, workdir)
        _print_section("ingest", results["ingest"])
    if "stats" in only:
        try:
            from stats_service.bench import run_bench as stats_bench
        except ImportError as error:
            results["stats"] = {"skipped": str(error)}
        else:
            results["stats"] = stats_bench(config.kafka_bootstrap, events=args.stats_events)
        _print_section("stats", results["stats"])
    if "recommender" in only:
        try:
            from recommender_service.bench import run_bench as recommender_bench
        except ImportError as error:
            results["recommender"] = {"skipped": str(error)}
        else:
            results["recommender"] = recommender_bench(config.kafka_bootstrap, events=args.recommender_events)
        _print_section("recommender", results["recommender"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def _print_section(name: str, values: dict[str, Any]) -> None:
    print(f"\n== {name} ==")
    width = max((len(k) for k in values), default=0)
    for key, value in values.items():
        print(f"  {key:<{width}}  {value}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
