"""GetSimilarMedia and RecommendForUser through a member of a two-instance recommender group.

    python -m benchmarks.recommender_fanout [--events 300000] [--clients 8] [--calls 4000]

A topic (`topic_partitions` partitions, 8 here) is pre-filled with `events` generated lines as
in `benchmarks.recommender`; two instances join one consumer group and split it, so every answer
of instance `a` is a fan-out to itself and to `b`. Once `a` answers completely, each query is
timed twice with `clients` concurrent asyncio clients (and with ghz when present): a first pass
over random items, then a second pass with the same items, which a cache keyed by the owners'
positions may answer (nothing changes in between). A single instance's figures on the same topic
are printed for reference. One two-instance run per `--fanout-cache-items` value (default: 0,
i.e. the cache off, then 5,000), so before and after are measured on the same topic and load.
The machine is shared, so numbers are of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
import uuid
from typing import Any

import grpc

from benchmarks.recommender import Service, data_file, ghz, latency, prefill, records
from benchmarks.scratch import scratch_topics
from viewevents.kafka import ensure_topics
from viewevents.v1 import recommender_service_pb2 as pb
from viewevents.v1 import recommender_service_pb2_grpc as pb_grpc
from viewevents_tools import settings_catalogue as settings


def wait_complete(address: str, partitions: int, timeout: float = 900) -> None:
    """Until `address` answers with a position listing every partition, caught up."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.RecommendForUser(pb.RecommendForUserRequest(user_id=1), timeout=5)
                if len(reply.position.partitions) == partitions and reply.position.caught_up:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"{address} gave no complete answer within {timeout} s")


def measure(
    address: str, media: int, users: int, clients: int, calls: int, label: str
) -> dict[str, Any]:
    """Two passes of the same random calls (seeded per client) from `clients` clients."""
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

    out: dict[str, Any] = {}
    for name, call, count in (
        ("GetSimilarMedia", similar, calls),
        ("RecommendForUser", recommend, calls // 4),
    ):
        for run in ("first pass", "same calls again"):
            result = asyncio.run(latency(address, name, count, clients, call))
            out[f"{label} {name} python x{clients} {run} p50/p99 ms"] = (
                f"{result['p50_ms']} / {result['p99_ms']} "
                f"({result['calls_per_s']} calls/s, {result['errors']} errors)"
            )
    found = ghz(
        address,
        "GetSimilarMedia",
        f'{{"media_id": "{{{{randomInt 1 {media + 1}}}}}", "limit": 10}}',
        calls,
        clients,
    )
    if found is not None:
        out[f"{label} GetSimilarMedia ghz x{clients} p50/p99 ms"] = (
            f"{found.get('p50_ms')} / {found.get('p99_ms')} "
            f"({found.get('calls_per_s')} calls/s, {found.get('errors')} errors)"
            if "error" not in found
            else found["error"]
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks.recommender_fanout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--media", type=int, default=2_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument("--no-single", action="store_true", help="skip the single instance")
    parser.add_argument(
        "--fanout-cache-items",
        type=int,
        nargs="+",
        default=[0, 5_000],
        help="one two-instance run per value of VIEWEVENTS_RECOMMENDER_FANOUT_CACHE_ITEMS (0: off)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    settings.add_flags(parser, ["kafka_bootstrap"])
    args = parser.parse_args(argv)
    bootstrap = settings.load(args).kafka_bootstrap
    path = data_file(args.events, args.users, args.media, 5)
    topic = f"bench-fanout-{uuid.uuid4().hex[:8]}"
    scratch_topics(bootstrap, topic, f"{topic}-dlq")
    config = settings.load(env={}).replace(
        kafka_bootstrap=bootstrap, topic_partitions=args.partitions
    )
    asyncio.run(ensure_topics(config, [topic]))  # before prefill, which would make the default
    produced, _ = asyncio.run(prefill(bootstrap, topic, records(path), args.events))
    env = {"VIEWEVENTS_LOG_LEVEL": "INFO", "VIEWEVENTS_TOPIC_PARTITIONS": str(args.partitions)}
    results: dict[str, Any] = {"events in topic": produced, "load average": os.getloadavg()}
    for items in args.fanout_cache_items:
        group_env = {
            **env,
            "VIEWEVENTS_RECOMMENDER_GROUP": f"bench-fanout-{uuid.uuid4().hex[:8]}",
            "VIEWEVENTS_RECOMMENDER_FANOUT_CACHE_ITEMS": str(items),
        }
        members = [Service(bootstrap, topic, f"fanout-{n}", group_env) for n in ("a", "b")]
        label = f"member (fan-out cache {items} items)"
        try:
            for member in members:
                member.start()
            for member in members:
                wait_complete(member.address, args.partitions)
            results[f"{label} load average"] = os.getloadavg()
            results.update(
                measure(members[0].address, args.media, args.users, args.clients, args.calls, label)
            )
        finally:
            for member in members:
                member.stop()
    if not args.no_single:
        single = Service(bootstrap, topic, "fanout-single", {"VIEWEVENTS_LOG_LEVEL": "INFO"})
        try:
            single.start()
            wait_complete(single.address, args.partitions)
            single.wait_log(r"cache warm for version", 600)
            results.update(
                measure(single.address, args.media, args.users, args.clients, args.calls, "single")
            )
        finally:
            single.stop()
    results["load average after"] = os.getloadavg()
    for key, value in results.items():
        print(f"{key:70} {value}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2, default=str)


if __name__ == "__main__":
    main()
