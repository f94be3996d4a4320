"""Recommender benchmark: consumer throughput from a pre-filled topic, then query latency.

    python -m benchmarks.recommender [--events 1000000] [--no-scale] [--kafka-bootstrap H:P]

Two phases, each on a fresh topic and a fresh state directory:
  stream  `events` generated lines (viewevents_tools.generator, 20,000 users x 2,000 media): the events the
          ingest service would accept are produced straight to the topic with aiokafka (keyed by
          user, partitioned like the ingest service), the service is started as a subprocess,
          and events/s is timed from process start to caught-up (health SERVING); the consumer's
          own count from its log is reported too.
  scale   the p99 target's size: 200,000 users x 10,000 media, same procedure.
After each catch-up the benchmark waits for the cache warmer, then measures p50/p99 of
GetSimilarMedia (both metrics, random items) and RecommendForUser (random users) with 8
concurrent asyncio clients, and with ghz when .cache/go/bin/ghz exists. Peak RSS is the
service's VmHWM. The machine is shared (2 CPUs here, the broker on the same host), so numbers
are of one run, not a guarantee.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from aiokafka import AIOKafkaProducer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

from benchmarks.measure import PeakRss, free_port, mib_and_mb, wait_log
from benchmarks.scratch import scratch_topics
from recommender_service import settings as local_settings
from viewevents.kafka import VIEW_EVENT_HEADERS, KeyPartitioner, ensure_topics, user_key
from viewevents.v1 import recommender_service_pb2 as pb
from viewevents.v1 import recommender_service_pb2_grpc as pb_grpc
from viewevents_tools import settings_catalogue as settings

REPO = Path(__file__).resolve().parent.parent
WORKDIR = REPO / ".data" / "bench"
GHZ = REPO / ".cache" / "go" / "bin" / "ghz"


def data_file(events: int, users: int, media: int, seed: int) -> Path:
    """A generated legacy file, cached under .data/bench (generation is not what is measured)."""
    from viewevents_tools.generator import generate

    WORKDIR.mkdir(parents=True, exist_ok=True)
    path = WORKDIR / f"recommender-{events}-{users}-{media}-{seed}.jsonl"
    if not path.exists():
        print(
            f"generating {events:,} lines ({users:,} users, {media:,} media) into {path}",
            flush=True,
        )
        partial = path.with_suffix(".partial")
        generate(
            str(partial), events, seed=seed, users=users, media=media, noise=0.02, progress=True
        )
        partial.rename(path)
    return path


def records(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of the events the ingest service would accept, in file order."""
    from ingest_service.validation import Limits, validate_event
    from viewevents_client.event_files import iter_file

    limits, now = Limits(), time.time()
    for _, parsed in iter_file(str(path)):
        event = parsed.event
        if event is not None and not validate_event(event, now, limits):
            yield user_key(event.user_id), event.SerializeToString()


async def prefill(
    bootstrap: str, topic: str, source: Iterator[tuple[bytes, bytes]], total: int
) -> tuple[int, float]:
    """Produce records in large per-partition batches; (records, seconds)."""
    config = settings.load(env={}).replace(kafka_bootstrap=bootstrap)
    await ensure_topics(config, [topic])
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        max_batch_size=1 << 20,
        max_request_size=4 << 20,
        linger_ms=20,
    )
    await producer.start()
    count = 0
    started = time.perf_counter()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        partitioner = KeyPartitioner(len(partitions))
        open_batches = {p: producer.create_batch() for p in partitions}
        in_flight: list[asyncio.Future] = []
        bar = tqdm(total=total, desc="prefill topic", unit=" events", unit_scale=True)

        async def send(partition: int) -> None:
            batch = open_batches[partition]
            in_flight.append(await producer.send_batch(batch, topic, partition=partition))
            bar.update(batch.record_count())
            open_batches[partition] = producer.create_batch()
            if len(in_flight) >= 32:
                await asyncio.gather(*in_flight)
                in_flight.clear()

        for key, value in source:
            partition = partitioner(key)
            if (
                open_batches[partition].append(
                    key=key, value=value, timestamp=None, headers=VIEW_EVENT_HEADERS
                )
                is None
            ):
                await send(partition)
                open_batches[partition].append(
                    key=key, value=value, timestamp=None, headers=VIEW_EVENT_HEADERS
                )
            count += 1
        for partition in partitions:
            if open_batches[partition].record_count():
                await send(partition)
        await asyncio.gather(*in_flight)
        bar.close()
    finally:
        await producer.stop()
    return count, time.perf_counter() - started


async def records_in(bootstrap: str, topic: str) -> int:
    """Records in an existing topic (0 when it does not exist)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            return 0
        consumer.subscribe([topic])  # makes the client fetch the topic's metadata
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not tps:
            return 0
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        return int(sum(ends[tp] - starts[tp] for tp in tps))
    finally:
        await consumer.stop()


class Service:
    """The recommender as a subprocess with its own topic, state directory and group."""

    def __init__(self, bootstrap: str, topic: str, name: str, env_extra: dict[str, str]) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.state = WORKDIR / f"{name}-state"
        shutil.rmtree(self.state, ignore_errors=True)
        self.log_path = WORKDIR / f"{name}.log"
        self.log_path.unlink(missing_ok=True)
        values: dict[str, Any] = dict(
            kafka_bootstrap=bootstrap,
            view_topic=topic,
            dead_letter_topic=f"{topic}-dlq",
            recommender_address=self.address,
            recommender_state_dir=str(self.state),
            recommender_group=f"bench-{uuid.uuid4().hex[:8]}",
        )
        known = {s.name for s in settings.ALL_SETTINGS}
        if "recommender_metrics_port" in known:
            values["recommender_metrics_port"] = 0
        config = settings.load(env={}).replace(**values)
        env = settings.to_environment(config)
        env.update(env_extra)
        self.env = env
        self.process: subprocess.Popen | None = None
        self.rss: PeakRss | None = None

    def start(self) -> float:
        started = time.perf_counter()
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "recommender_service"],
            env=self.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.rss = PeakRss(self.process.pid)
        return started

    def peak_rss_mib(self) -> float:
        return self.rss.peak_mb() if self.rss is not None else 0.0

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the service so far (all its threads, RocksDB's too): the
        figure that stays meaningful when the shared machine's wall clock is noisy."""
        if self.rss is None:
            return 0.0
        times = self.rss.process.cpu_times()
        return float(times.user + times.system)

    def wait_caught_up(self, total: int, timeout: float = 1800) -> float:
        """Until health says SERVING; a progress bar follows the answers' position."""
        deadline = time.monotonic() + timeout
        bar = tqdm(total=total, desc="recommender consume", unit=" events", unit_scale=True)
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.RecommenderServiceStub(channel)
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"recommender exited; see {self.log_path}")
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        bar.update(total - bar.n)
                        bar.close()
                        return time.perf_counter()
                    reply = stub.RecommendForUser(pb.RecommendForUserRequest(user_id=1), timeout=2)
                    bar.update(sum(p.offset for p in reply.position.partitions) - bar.n)
                except grpc.RpcError:
                    pass
                time.sleep(0.25)
        raise TimeoutError(f"not caught up after {timeout} s; see {self.log_path}")

    def wait_log(self, pattern: str, timeout: float) -> re.Match | None:
        return asyncio.run(wait_log(self.log_path, pattern, timeout))

    def stop(self) -> None:
        if self.rss is not None:
            self.rss.stop()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


Request = Callable[[pb_grpc.RecommenderServiceStub, random.Random], Awaitable[Any]]


async def latency(
    address: str, name: str, calls: int, clients: int, request: Request
) -> dict[str, float]:
    """p50/p99 (ms) and calls/s of `calls` calls from `clients` concurrent asyncio clients,
    each on its own channel."""
    samples: list[float] = []
    errors = 0
    per_client = max(1, calls // clients)
    bar = tqdm(total=per_client * clients, desc=name, unit=" calls", leave=False)

    async def client(seed: int) -> None:
        nonlocal errors
        rng = random.Random(seed)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            try:
                await request(stub, rng)  # connect before timing
            except grpc.aio.AioRpcError:
                pass  # e.g. NOT_FOUND for a media id the (small) data set never has: counted below
            for _ in range(per_client):
                began = time.perf_counter()
                try:
                    await request(stub, rng)
                except grpc.aio.AioRpcError:
                    errors += 1
                samples.append(time.perf_counter() - began)
                bar.update(1)

    started = time.perf_counter()
    await asyncio.gather(*(client(1000 + k) for k in range(clients)))
    elapsed = time.perf_counter() - started
    bar.close()
    samples.sort()
    return {
        "p50_ms": round(1000 * samples[len(samples) // 2], 2),
        "p99_ms": round(1000 * samples[int(0.99 * (len(samples) - 1))], 2),
        "calls_per_s": round(len(samples) / elapsed),
        "errors": errors,
    }


def ghz(address: str, method: str, data: str, calls: int, clients: int) -> dict[str, Any] | None:
    """The same load from ghz (Go), whose client costs far less CPU than Python's."""
    if not GHZ.exists():
        return None
    output = subprocess.run(
        [
            str(GHZ),
            "--insecure",
            "--proto",
            str(REPO / "protos/viewevents/v1/recommender_service.proto"),
            "--import-paths",
            str(REPO / "protos"),
            "--call",
            f"viewevents.v1.RecommenderService/{method}",
            "-d",
            data,
            "-c",
            str(clients),
            "-n",
            str(calls),
            "--format",
            "json",
            address,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if output.returncode != 0:
        return {"error": output.stderr.strip()[:200]}
    report = json.loads(output.stdout)
    percentiles = {
        p["percentage"]: p["latency"] / 1e6 for p in report.get("latencyDistribution") or []
    }
    codes = {k: v for k, v in (report.get("statusCodeDistribution") or {}).items() if k != "OK"}
    # Which errors: e.g. NOT_FOUND for a random id the data set never produced (an item with no
    # event at all) versus DEADLINE_EXCEEDED or UNAVAILABLE from the service.
    details = report.get("errorDistribution") or {}
    return {
        "p50_ms": round(percentiles.get(50, float("nan")), 2),
        "p99_ms": round(percentiles.get(99, float("nan")), 2),
        "calls_per_s": round(report.get("rps", 0)),
        "errors": sum(codes.values()),
        "error_codes": "; ".join(f"{k} x{v}" for k, v in sorted(codes.items()))
        + ("" if not details else " (" + "; ".join(f"{k} x{v}" for k, v in details.items()) + ")"),
    }


def phase(
    bootstrap: str,
    name: str,
    events: int,
    users: int,
    media: int,
    seed: int,
    clients: int,
    calls: int,
    env_extra: dict[str, str],
    keep_topic: bool = False,
) -> dict[str, Any]:
    """Prefill, consume from process start to caught-up, then latency under load. With
    `keep_topic` the topic is named by the data set and reused when a run filled it before
    (prefilling on a loaded machine can take longer than the measurement)."""
    path = data_file(events, users, media, seed)
    topic = f"bench-rec-{name}-{events}-{users}-{media}-{seed}"
    kept = asyncio.run(records_in(bootstrap, topic)) if keep_topic else 0
    if kept and kept < 0.9 * events:  # an interrupted prefill: the noise rejects only ~2 %
        kept, topic = 0, f"{topic}-{uuid.uuid4().hex[:8]}"
        scratch_topics(bootstrap, topic, f"{topic}-dlq")
    out: dict[str, Any] = {"users x media": f"{users:,} x {media:,}", "topic": topic}
    if kept:
        produced = kept  # an earlier run with --keep-topic filled it; consume it again
        out["events in topic"] = f"{produced} (kept from an earlier run)"
    else:
        if not keep_topic:
            topic += f"-{uuid.uuid4().hex[:8]}"
            scratch_topics(bootstrap, topic, f"{topic}-dlq")
        produced, produce_seconds = asyncio.run(prefill(bootstrap, topic, records(path), events))
        out["events in topic"] = produced
        out["prefill events/s"] = round(produced / produce_seconds)
    service = Service(bootstrap, topic, f"recommender-{name}", env_extra)
    started = service.start()
    try:
        serving = service.wait_caught_up(produced)
        seconds = serving - started
        out["catch-up s (process start to SERVING)"] = round(seconds, 1)
        out["events/s (process start to SERVING)"] = round(produced / seconds)
        cpu = service.cpu_seconds()
        out["service CPU s to SERVING (events per CPU-second)"] = (
            f"{cpu:.1f} ({round(produced / cpu) if cpu else 0})"
        )
        out["load average at SERVING"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        logged = service.wait_log(r"caught up[^:\n]*: (\d+) records applied in ([\d.]+) s", 10)
        if logged:
            out["events/s (consumer, from its log)"] = round(
                int(logged.group(1)) / float(logged.group(2))
            )
        out["peak RSS (catch-up)"] = mib_and_mb(service.peak_rss_mib())
        warm = service.wait_log(r"cache warm for version \d+: (\d+) items in ([\d.]+) s", 600)
        out["cache warm-up"] = f"{warm.group(1)} items in {warm.group(2)} s" if warm else "not seen"
        metrics = [pb.SIMILARITY_METRIC_COSINE, pb.SIMILARITY_METRIC_PEARSON]

        async def similar(stub: pb_grpc.RecommenderServiceStub, rng: random.Random) -> Any:
            return await stub.GetSimilarMedia(
                pb.GetSimilarMediaRequest(
                    media_id=rng.randint(1, media), limit=10, metric=rng.choice(metrics)
                ),
                timeout=10,
            )

        async def recommend(stub: pb_grpc.RecommenderServiceStub, rng: random.Random) -> Any:
            return await stub.RecommendForUser(
                pb.RecommendForUserRequest(user_id=rng.randint(1, users), limit=10), timeout=10
            )

        for label, call in (("GetSimilarMedia", similar), ("RecommendForUser", recommend)):
            for concurrency in sorted({1, clients}):
                cpu = service.cpu_seconds()
                result = asyncio.run(latency(service.address, label, calls, concurrency, call))
                out[f"{label} python x{concurrency} p50/p99 ms"] = (
                    f"{result['p50_ms']} / {result['p99_ms']}"
                )
                out[f"{label} python x{concurrency} service CPU ms per call"] = round(
                    1000 * (service.cpu_seconds() - cpu) / calls, 3
                )
                out[f"{label} python x{concurrency} calls/s (errors)"] = (
                    f"{result['calls_per_s']} ({result['errors']})"
                )
        for label, data in (
            ("GetSimilarMedia", f'{{"media_id": "{{{{randomInt 1 {media + 1}}}}}", "limit": 10}}'),
            ("RecommendForUser", f'{{"user_id": "{{{{randomInt 1 {users + 1}}}}}", "limit": 10}}'),
        ):
            cpu = service.cpu_seconds()
            ghz_result = ghz(service.address, label, data, calls * 2, clients)
            if ghz_result is not None:
                out[f"{label} ghz service CPU ms per call"] = round(
                    1000 * (service.cpu_seconds() - cpu) / (calls * 2), 3
                )
                out[f"{label} ghz x{clients} p50/p99 ms"] = (
                    f"{ghz_result.get('p50_ms')} / {ghz_result.get('p99_ms')}"
                    if "error" not in ghz_result
                    else ghz_result["error"]
                )
                out[f"{label} ghz calls/s (errors)"] = (
                    f"{ghz_result.get('calls_per_s')} ({ghz_result.get('errors')})"
                )
                if ghz_result.get("errors"):
                    out[f"{label} ghz errors by status"] = ghz_result.get("error_codes")
        out["peak RSS (whole run)"] = mib_and_mb(service.peak_rss_mib())
        out["state dir MB"] = round(
            sum(f.stat().st_size for f in service.state.rglob("*") if f.is_file()) / 2**20, 1
        )
    finally:
        service.stop()
    return out


def run_bench(
    bootstrap: str,
    events: int = 1_000_000,
    *,
    users: int = 20_000,
    media: int = 2_000,
    seed: int = 5,
    clients: int = 8,
    calls: int = 4_000,
    stream: bool = True,
    scale: bool = True,
    scale_events: int = 6_000_000,
    scale_users: int = 200_000,
    scale_media: int = 10_000,
    env_extra: dict[str, str] | None = None,
    keep_topic: bool = False,
) -> dict[str, Any]:
    """Both phases; a flat dict of readable measurements (printed by benchmarks.ingest).
    `env_extra` adds environment variables for the service (e.g. a larger RocksDB cache)."""
    env_extra = {"VIEWEVENTS_LOG_LEVEL": "INFO", **(env_extra or {})}
    results: dict[str, Any] = {
        "settings": str(local_settings.from_config()),
        "service environment": " ".join(f"{k}={v}" for k, v in sorted(env_extra.items())),
    }
    if stream:
        for key, value in phase(
            bootstrap, "stream", events, users, media, seed, clients, calls, env_extra, keep_topic
        ).items():
            results[f"[{events // 1000}k] {key}"] = value
    if scale:
        for key, value in phase(
            bootstrap,
            "scale",
            scale_events,
            scale_users,
            scale_media,
            seed,
            clients,
            calls,
            env_extra,
            keep_topic,
        ).items():
            results[f"[scale] {key}"] = value
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks.recommender",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--media", type=int, default=2_000)
    parser.add_argument("--calls", type=int, default=4_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--no-scale", action="store_true", help="skip the 200k x 10k phase")
    parser.add_argument("--only-scale", action="store_true", help="skip the first phase")
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the service, e.g. VIEWEVENTS_ROCKSDB_CACHE_MB=512",
    )
    parser.add_argument("--scale-events", type=int, default=6_000_000)
    parser.add_argument(
        "--keep-topic",
        action="store_true",
        help="name topics by data set and consume one an earlier --keep-topic run filled",
    )
    parser.add_argument("--json", help="also write the results to this file")
    settings.add_flags(parser, ["kafka_bootstrap"])
    args = parser.parse_args(argv)
    config = settings.load(args)
    results = run_bench(
        config.kafka_bootstrap,
        args.events,
        users=args.users,
        media=args.media,
        clients=args.clients,
        calls=args.calls,
        stream=not args.only_scale,
        scale=not args.no_scale,
        scale_events=args.scale_events,
        env_extra=dict(item.split("=", 1) for item in args.service_env),
        keep_topic=args.keep_topic,
    )
    width = max(len(k) for k in results)
    print("\n== recommender ==")
    for key, value in results.items():
        print(f"  {key:<{width}}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
