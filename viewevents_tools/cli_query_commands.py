"""Query subcommands of `viewevents`: stats, trend, top, similar, recommend.

Readable tables by default, `--json` (protobuf JSON) for scripts; `trend` draws a bar chart in
the terminal or, with `--plot FILE`, a PNG (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from viewevents_client.query_client import GRANULARITIES, SIMILARITY, TOP_METRICS, QueryClient
from viewevents_tools import settings_catalogue as settings

BAR = "█"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns aligned; numbers right, text left."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [
        all(isinstance(row[i], (int, float)) for row in rows) if rows else False
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def parse_time(text: str) -> datetime:
    """ISO 8601 (naive = UTC), or relative to now: -24h, -7d, -90m, now."""
    now = datetime.now(UTC)
    if text == "now":
        return now
    if text.startswith("-") and text[-1] in "mhd":
        unit = {"m": "minutes", "h": "hours", "d": "days"}[text[-1]]
        return now - timedelta(**{unit: float(text[1:-1])})
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _time(stamp: object) -> str:
    return stamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M") if stamp.seconds else "-"  # type: ignore[attr-defined]


def _emit_json(message: Message) -> None:
    print(json.dumps(json_format.MessageToDict(message), indent=2))


def cmd_stats(args: argparse.Namespace, client: QueryClient) -> None:
    reply = client.media_stats(args.media_id)
    if args.json:
        return _emit_json(reply)
    s = reply.stats
    print(
        table(
            [
                "media",
                "view time (s)",
                "starts",
                "stops",
                "ends",
                "viewers",
                "completion",
                "avg s/viewer",
                "first event",
                "last event",
            ],
            [
                [
                    str(s.media_id),
                    s.view_time_seconds,
                    s.starts,
                    s.stops,
                    s.ends,
                    s.unique_viewers,
                    s.completion_rate,
                    s.average_view_time_seconds_per_viewer,
                    _time(s.first_event_time),
                    _time(s.last_event_time),
                ]
            ],
        )
    )


def cmd_trend(args: argparse.Namespace, client: QueryClient) -> None:
    reply = client.media_trend(
        args.media_id,
        parse_time(args.start),
        parse_time(args.end),
        args.granularity,
        args.include_empty,
    )
    if args.json:
        return _emit_json(reply)
    values = [getattr(b, args.metric) for b in reply.buckets]
    if args.plot:
        plot_png(
            args.plot,
            [b.start_time.ToDatetime() for b in reply.buckets],
            values,
            f"media {args.media_id}: {args.metric} per {args.granularity}",
        )
        print(f"wrote {args.plot}")
    peak = max(values, default=0) or 1
    print(
        f"media {args.media_id}, {args.metric} per {args.granularity} "
        f"({len(reply.buckets)} buckets, {reply.unique_viewers:,} viewers in range)"
    )
    for bucket, value in zip(reply.buckets, values):
        print(
            f"{_time(bucket.start_time)}  {value:>10,}  {BAR * max(1 if value else 0, round(40 * value / peak))}"
        )


def plot_png(path: str, times: list[datetime], values: list[int], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 4))
    width = (times[1] - times[0]) * 0.9 if len(times) > 1 else timedelta(minutes=1)
    axes.bar(times, values, width=width)  # type: ignore[arg-type]  # matplotlib takes dates
    axes.set_title(title)
    axes.set_ylabel(title.split(":")[1].split(" per ")[0].strip())
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def cmd_top(args: argparse.Namespace, client: QueryClient) -> None:
    reply = client.top_media(
        parse_time(args.start), parse_time(args.end), args.metric, args.limit, args.page_token
    )
    if args.json:
        return _emit_json(reply)
    print(
        table(
            ["rank", "media", "view time (s)", "starts", "viewers"],
            [
                [m.rank, str(m.media_id), m.view_time_seconds, m.starts, m.unique_viewers]
                for m in reply.media
            ],
        )
    )
    if reply.next_page_token:
        print(f"next page: --page-token {reply.next_page_token}")


def cmd_similar(args: argparse.Namespace, client: QueryClient) -> None:
    reply = client.similar_media(args.media_id, args.limit, args.metric)
    if args.json:
        return _emit_json(reply)
    print(
        table(
            ["media", args.metric, "co-viewers"],
            [[str(m.media_id), m.score, m.co_viewers] for m in reply.similar_media],
        )
    )


def cmd_recommend(args: argparse.Namespace, client: QueryClient) -> None:
    reply = client.recommend(args.user_id, args.limit)
    if args.json:
        return _emit_json(reply)
    if reply.fallback:
        print("(no usable history for this user: the most watched items)")
    print(table(["media", "score"], [[str(r.media_id), r.score] for r in reply.recommendations]))


def add_query_commands(commands: argparse._SubParsersAction) -> None:
    defaults = settings.load()

    def command(name: str, help_text: str, handler: object) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text)
        parser.add_argument("--stats-address", default=defaults.stats_address)
        parser.add_argument("--recommender-address", default=defaults.recommender_address)
        parser.add_argument("--tls-ca", help="CA certificate (PEM) when the services use TLS")
        parser.add_argument(
            "--stats-token",
            default=defaults.stats_token or None,
            help="bearer token of the stats service (env VIEWEVENTS_STATS_TOKEN)",
        )
        parser.add_argument(
            "--recommender-token",
            default=defaults.recommender_token or None,
            help="bearer token of the recommender service (env VIEWEVENTS_RECOMMENDER_TOKEN)",
        )
        parser.add_argument("--json", action="store_true", help="print the response as JSON")
        parser.set_defaults(func=_run(handler))
        return parser

    p = command("stats", "all-time totals of a media item", cmd_stats)
    p.add_argument("media_id", type=int)
    p = command("trend", "a media item's buckets over a time range", cmd_trend)
    p.add_argument("media_id", type=int)
    p.add_argument("--start", default="-24h", help="ISO 8601 or relative (-24h, -7d); default -24h")
    p.add_argument("--end", default="now")
    p.add_argument("--granularity", choices=sorted(GRANULARITIES), default="hour")
    p.add_argument(
        "--metric",
        default="view_time_seconds",
        choices=["view_time_seconds", "starts", "stops", "ends", "unique_viewers"],
    )
    p.add_argument("--include-empty", action="store_true")
    p.add_argument("--plot", metavar="FILE", help="also write a PNG chart")
    p = command("top", "the most watched media in a time range", cmd_top)
    p.add_argument("--start", default="-7d")
    p.add_argument("--end", default="now")
    p.add_argument("--metric", choices=sorted(TOP_METRICS), default="view-time")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--page-token", default="")
    p = command("similar", "media similar to a media item", cmd_similar)
    p.add_argument("media_id", type=int)
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--metric", choices=sorted(SIMILARITY), default="cosine")
    p = command("recommend", "recommendations for a user", cmd_recommend)
    p.add_argument("user_id", type=int)
    p.add_argument("--limit", type=int, default=10)


def _run(handler: object):
    def run(args: argparse.Namespace) -> int:
        with QueryClient(
            args.stats_address,
            args.recommender_address,
            args.tls_ca,
            args.stats_token,
            args.recommender_token,
        ) as client:
            try:
                handler(args, client)  # type: ignore[operator]
            except grpc.RpcError as error:
                print(f"{error.code().name}: {error.details()}", file=sys.stderr)
                from viewevents.rpc.errors import field_violations_of

                for violation in field_violations_of(error):
                    print(f"  {violation.field}: {violation.description}", file=sys.stderr)
                return 1
        return 0

    return run
