"""`viewevents`: upload view-event files, generate synthetic data, query the services.

viewevents upload FILE... [--address HOST:PORT] [--batch-size N] [--resumable]
viewevents gen OUT --events N [--seed S] ...
viewevents stats MEDIA | trend MEDIA | top | similar MEDIA | recommend USER  [--json]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import TextIO

import grpc
from tqdm import tqdm

from viewevents_client.event_files import iter_file
from viewevents_client.uploads import (
    DEFAULT_BATCH_SIZE,
    LineIndex,
    ViewEvent,
    open_channel,
    upload,
    upload_resumable,
)
from viewevents_tools import settings_catalogue as settings

MAX_PROBLEMS_SHOWN = 20


class _FileProblems:
    """Counts and shows (the first few) lines that could not be sent."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.not_events = 0
        self.client_rejected = 0
        self.too_large = 0
        self.shown = 0

    def report(self, where: str, text: str) -> None:
        if self.shown < MAX_PROBLEMS_SHOWN:
            print(f"{where}: {text}", file=self.out)
        elif self.shown == MAX_PROBLEMS_SHOWN:
            print("... (further problems counted, not shown)", file=self.out)
        self.shown += 1


def _events_of(
    paths: Sequence[str], index: LineIndex, problems: _FileProblems
) -> Iterator[ViewEvent]:
    for path in paths:
        for line_number, parsed in iter_file(path):
            where = f"{path}:{line_number}"
            if parsed.error is not None:
                problems.not_events += 1
                problems.report(where, f"not an event: {parsed.error}")
            elif any(v.reason == "TOO_LARGE" for v in parsed.violations):
                problems.too_large += 1
                problems.report(
                    where,
                    "skipped, too large: " + "; ".join(v.description for v in parsed.violations),
                )
            elif parsed.violations:
                problems.client_rejected += 1
                problems.report(
                    where, "rejected: " + "; ".join(v.description for v in parsed.violations)
                )
            elif parsed.event is not None:
                index.add(path, line_number)
                yield parsed.event


def cmd_upload(args: argparse.Namespace) -> int:
    index = LineIndex()
    problems = _FileProblems(sys.stderr)
    bar = tqdm(
        unit=" events",
        unit_scale=True,
        desc="upload",
        disable=args.no_progress,
        smoothing=0.1,
        dynamic_ncols=True,
    )
    events = _events_of(args.files, index, problems)
    try:
        if args.resumable:
            summary = upload_resumable(
                lambda: open_channel(args.address, args.tls_ca, args.token),
                events,
                args.batch_size,
                on_ack=lambda ack: bar.update(ack.received),
            )
        else:
            with open_channel(args.address, args.tls_ca, args.token) as channel:
                summary = upload(channel, events, args.batch_size, on_batch=bar.update)
    except grpc.RpcError as error:
        bar.close()
        print(f"upload failed: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    bar.close()
    for rejection in summary.rejections:
        path, line = index.locate(rejection.index)
        problems.report(
            f"{path}:{line}",
            "rejected by the server: "
            + "; ".join(v.description for v in rejection.field_violations),
        )
    print(
        f"sent {summary.received} events in {summary.requests} requests: "
        f"{summary.accepted} accepted, {summary.rejected} rejected by the server "
        f"(kept on the dead-letter topic); {problems.client_rejected} lines rejected before "
        f"sending, {problems.not_events} lines not events, {problems.too_large} lines skipped "
        f"as too large to upload"
    )
    return 0


def cmd_gen(args: argparse.Namespace) -> int:
    from viewevents_tools import generator

    return generator.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="viewevents", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = settings.load()

    up = commands.add_parser(
        "upload", help="stream event files (JSON lines, .gz ok) to the ingest service"
    )
    up.add_argument("files", nargs="+", metavar="FILE")
    up.add_argument(
        "--address",
        default=defaults.ingest_address,
        help="ingest service address (env VIEWEVENTS_INGEST_ADDRESS)",
    )
    up.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="events per request")
    up.add_argument("--no-progress", action="store_true", help="no progress bar")
    up.add_argument(
        "--resumable",
        action="store_true",
        help="use UploadStream: acks per batch, reconnects and resumes after failures",
    )
    up.add_argument("--tls-ca", help="CA certificate (PEM) when the service uses TLS")
    up.add_argument(
        "--token",
        default=defaults.ingest_token or None,
        help="bearer token (env VIEWEVENTS_INGEST_TOKEN)",
    )
    up.set_defaults(func=cmd_upload)

    from viewevents_tools import generator

    generate = commands.add_parser("gen", help="write a synthetic, seeded data set (legacy format)")
    generator.add_arguments(generate)
    generate.set_defaults(func=cmd_gen)

    from viewevents_tools import dead_letters

    dead = commands.add_parser(
        "dead-letters", help="show rejected events and why (dead-letter topic)"
    )
    dead_letters.add_arguments(dead)
    dead.set_defaults(func=dead_letters.run)

    from viewevents_tools.cli_query_commands import add_query_commands

    add_query_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
