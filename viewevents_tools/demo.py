"""`make demo`: the whole product in one command, on the local broker.

Generates a seeded data set of the last two days, uploads it with the progress bar, waits until
the stats and recommender consumers have applied it, then prints a few answers. The services run
as subprocesses with fresh topics and state under .data/demo, and are stopped at the end.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from viewevents_client.event_files import iter_file
from viewevents_client.query_client import QueryClient
from viewevents_client.uploads import open_channel, upload
from viewevents_tools import settings_catalogue as settings
from viewevents_tools.cli_query_commands import table
from viewevents_tools.generator import generate
from viewevents_tools.processes import start_service, stop_service

REPO = Path(__file__).resolve().parent.parent


def wait_applied(client: QueryClient, positions: dict[int, int], timeout: float = 600) -> float:
    """Until both consumers' positions reach the upload's end offsets; returns seconds waited."""
    started = time.monotonic()
    now = datetime.now(UTC)
    while True:
        stats_at = {
            p.partition: p.offset
            for p in client.top_media(now - timedelta(days=1), now, limit=1).position.partitions
        }
        rec_at = {p.partition: p.offset for p in client.recommend(1, 1).position.partitions}
        if all(stats_at.get(p, 0) >= o and rec_at.get(p, 0) >= o for p, o in positions.items()):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError("consumers did not catch up in time")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="viewevents_tools.demo", description=__doc__)
    parser.add_argument("--events", type=int, default=300_000)
    args = parser.parse_args(argv)
    stamp = time.strftime("%Y%m%d%H%M%S")
    workdir = REPO / ".data" / "demo" / stamp
    workdir.mkdir(parents=True)
    base = settings.load()
    config = base.replace(
        view_topic=f"demo-view-events-{stamp}",
        dead_letter_topic=f"demo-dead-letter-{stamp}",
        stats_state_dir=str(workdir / "stats"),
        recommender_state_dir=str(workdir / "recommender"),
        stats_group=f"demo-stats-{stamp}",
        recommender_group=f"demo-recommender-{stamp}",
        ingest_metrics_port=0,
        stats_metrics_port=0,
        recommender_metrics_port=0,
    )
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=2)
    data = workdir / "events.jsonl.gz"
    print(f"1. generating {args.events:,} events of the last two days into {data}")
    generate(
        str(data),
        args.events,
        seed=7,
        users=20_000,
        media=2_000,
        groups=20,
        noise=0.02,
        start=start,
        days=2,
        progress=True,
    )
    print("2. starting ingest, stats and recommender (fresh topics and state)")
    env = settings.to_environment(config)
    services = [
        start_service("ingest_service", env, config.ingest_address, workdir / "ingest.log"),
        start_service("stats_service", env, config.stats_address, workdir / "stats.log"),
        start_service(
            "recommender_service", env, config.recommender_address, workdir / "recommender.log"
        ),
    ]
    try:
        print("3. uploading (client streaming, acknowledged once durable in Kafka)")
        from tqdm import tqdm

        bar = tqdm(unit=" events", unit_scale=True, desc="upload")
        events = (parsed.event for _, parsed in iter_file(str(data)) if parsed.event is not None)
        with open_channel(config.ingest_address) as channel:
            summary = upload(channel, events, on_batch=bar.update)
        bar.close()
        print(
            f"   {summary.accepted:,} accepted, {summary.rejected:,} rejected (dead-letter topic)"
        )
        with QueryClient(config.stats_address, config.recommender_address) as client:
            waited = wait_applied(client, {p.partition: p.offset for p in summary.positions})
            print(
                f"4. both consumers applied the upload {waited:.1f} s after it was acknowledged\n"
            )
            now = datetime.now(UTC)
            top = client.top_media(start, now, "view-time", 5)
            print("Top 5 media by view time, last two days:")
            print(
                table(
                    ["rank", "media", "view time (s)", "starts", "viewers"],
                    [
                        [m.rank, str(m.media_id), m.view_time_seconds, m.starts, m.unique_viewers]
                        for m in top.media
                    ],
                )
            )
            best = top.media[0].media_id
            s = client.media_stats(best).stats
            print(
                f"\nMedia {best}: {s.view_time_seconds:,} s watched by {s.unique_viewers:,} viewers, "
                f"{s.starts:,} starts, completion rate {s.completion_rate:.1%}"
            )
            trend = client.media_trend(best, start, now, "hour")
            peak = max((b.view_time_seconds for b in trend.buckets), default=1) or 1
            print(f"\nView time per hour of media {best}:")
            for bucket in trend.buckets[-12:]:
                when = bucket.start_time.ToDatetime(tzinfo=UTC).strftime("%m-%d %H:%M")
                print(
                    f"  {when}  {bucket.view_time_seconds:>8,}  {'█' * round(40 * bucket.view_time_seconds / peak)}"
                )
            similar = client.similar_media(best, 5)
            print(f"\nMedia similar to {best} (cosine):")
            print(
                table(
                    ["media", "score", "co-viewers"],
                    [[str(m.media_id), m.score, m.co_viewers] for m in similar.similar_media],
                )
            )
            picks = client.recommend(42, 5)
            print(
                f"\nRecommended for user 42{' (fallback: most watched)' if picks.fallback else ''}:"
            )
            print(
                table(
                    ["media", "score"], [[str(r.media_id), r.score] for r in picks.recommendations]
                )
            )
    except grpc.RpcError as error:
        print(f"demo failed: {error.code().name}: {error.details()}")
        raise SystemExit(1) from error
    finally:
        for process in services:
            stop_service(process)
    print(f"\nLogs and state: {workdir}")


if __name__ == "__main__":
    main()
