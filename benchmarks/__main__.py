"""`make bench`: throughput and latency of the running product, on the local broker.

Not a test: it prints measurements of one run. Sections: ingest (client-streaming upload,
acknowledged end to end, against Kafka's own ProducerPerformance on the same broker), the
stats and recommender consumers and queries, and scale-out (1 vs 2 instances: consume rate,
query latency, freshness, failover, partition takeover; benchmarks/scale.py, flags --scale-*).

    python -m benchmarks [--events N] [--only ingest|stats|recommender|scale] [--json FILE]
    python -m benchmarks --rss-events 10000000   # only: stats and recommender RSS along a stream
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks import ingest, recommender, rss_stream, scale, stats
from viewevents_tools import settings_catalogue as settings
from viewevents_tools.processes import REPO


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--events", type=int, default=1_000_000, help="events for the ingest upload"
    )
    parser.add_argument("--stats-events", type=int, default=2_000_000)
    parser.add_argument(
        "--stats-days", type=float, default=35, help="days of event time of the stats events"
    )
    parser.add_argument(
        "--recommender-events",
        type=int,
        default=1_000_000,
        help="events of the recommender's 20k x 2k phase; 0 skips that phase",
    )
    parser.add_argument(
        "--recommender-scale-events",
        type=int,
        default=6_000_000,
        help="events of the recommender's 200k x 10k phase; 0 skips that phase",
    )
    parser.add_argument(
        "--recommender-keep-topic",
        action="store_true",
        help="recommender topics named by data set, reused when an earlier run filled them",
    )
    parser.add_argument("--batch-size", type=int, default=5_000)
    parser.add_argument(
        "--only", choices=["ingest", "stats", "recommender", "scale"], action="append"
    )
    parser.add_argument("--json", help="also write the results to this file")
    scale.add_flags(parser, prefix="scale-")
    parser.add_argument(
        "--rss-events",
        type=int,
        default=0,
        help="instead of the sections: stream this many events through the stats service and "
        "the recommender and print their RSS at regular event counts (benchmarks/rss_stream.py)",
    )
    parser.add_argument("--rss-samples", type=int, default=20)
    parser.add_argument(
        "--rss-set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="give both services of the RSS stream a setting instead of its default "
        "(repeatable; e.g. memory_budget_mb=120)",
    )
    settings.add_flags(parser, ["kafka_bootstrap"])
    args = parser.parse_args(argv)
    config = settings.load(args)
    workdir = REPO / ".data" / "bench"
    workdir.mkdir(parents=True, exist_ok=True)
    only = set(args.only or ["ingest", "stats", "recommender", "scale"])
    results: dict[str, Any] = {}
    if args.rss_events:
        results["rss_stream"] = rss_stream.run_rss_stream(
            config.kafka_bootstrap,
            args.rss_events,
            args.rss_samples,
            dict(item.split("=", 1) for item in args.rss_set),
        )
        _print_section("stats and recommender RSS along the stream", results["rss_stream"])
        only = set()
    if "ingest" in only:
        results["ingest"] = ingest.bench_ingest(config, args.events, args.batch_size, workdir)
        _print_section("ingest", results["ingest"])
    if "stats" in only:
        results["stats"] = stats.run_bench(
            config.kafka_bootstrap, events=args.stats_events, days=args.stats_days
        )
        _print_section("stats", results["stats"])
    if "recommender" in only:
        results["recommender"] = recommender.run_bench(
            config.kafka_bootstrap,
            events=args.recommender_events,
            stream=args.recommender_events > 0,
            scale=args.recommender_scale_events > 0,
            scale_events=args.recommender_scale_events,
            keep_topic=args.recommender_keep_topic,
        )
        _print_section("recommender", results["recommender"])
    if "scale" in only:  # prints its own tables
        results["scale"] = scale.run_bench(
            config.kafka_bootstrap, scale.options_from(args, prefix="scale-")
        )
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
