"""`make soak`: upload and query continuously; each service's memory must stay flat.

    python -m drills.soak [--minutes 10] [--rate 2000] [--preload 2000000] [--warmup-minutes 2]
                          [--tolerance 0.15]

On its own broker and services (drills.stack). The warm-up has two parts: first `--preload`
events uploaded at full speed and applied by both consumers (so that the state is larger than
every bounded cache and the consumers have been through full-size batches), then the first
`--warmup-minutes` of the timed minutes. During the timed minutes one thread uploads generated batches (fresh event
ids, so the state keeps growing like production's) at `--rate` events/s through the client's
Upload, two threads call every query RPC in turn (GetMediaStats, GetMediaTrend, ListTopMedia,
GetSimilarMedia, RecommendForUser) with random ids. Every minute a row gives each process's
peak resident memory (RSS, read every second) in that minute, and each consumer's lag (events
stored but not applied yet). At the end, per service, two rules, and breaking either exits 1: the
highest RSS after the warm-up may exceed the peak of the warm-up's last minute by at most
`--tolerance`, and, with the minutes after the warm-up cut in two halves, the highest of the
second half may exceed the highest of the first by at most `--tolerance` (a slow leak that the
first rule's slack hides keeps growing into the second half). Bounded caches that still fill
after that need a larger preload or a longer `--warmup-minutes`, not a looser rule. A service
that died, a query failing with anything but NOT_FOUND, or a consumer more than a minute of the
upload behind at the end (an overload of the machine, not a steady state) exits 1 too.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import numpy as np
import psutil
from google.protobuf.timestamp_pb2 import Timestamp
from tqdm import tqdm

from drills import stack
from viewevents.bootstrap import memory_plan
from viewevents.memory import FETCH_HELD_RESPONSES
from viewevents.v1 import view_event_pb2 as ve
from viewevents_client.query_client import QueryClient
from viewevents_client.uploads import CHANNEL_OPTIONS, upload

EVENT_TYPES = (
    [ve.EVENT_TYPE_STREAM_START]
    + [ve.EVENT_TYPE_WAYPOINT] * 8
    + [ve.EVENT_TYPE_STREAM_STOP, ve.EVENT_TYPE_STREAM_END]
)


class Load:
    """The upload and query loops, and their counters."""

    def __init__(
        self,
        drill: stack.Stack,
        rate: float,
        batch_size: int,
        users: int,
        media: int,
        seed: int,
        queries: str = "stats,trend,top,similar,recommend",
    ) -> None:
        self.drill = drill
        self.query_kinds = [q for q in queries.split(",") if q]
        self.rate = rate
        self.batch_size = batch_size
        self.users = users
        self.media = media
        self.seed = seed
        self.stop = threading.Event()
        self._rng = random.Random(seed)  # the preload's and then the paced loop's events
        self.uploaded = 0
        self.preloaded = 0  # of `uploaded`, before the timed minutes
        self.ends: dict[int, int] = {}  # per partition, the offset just past the last stored event
        self.upload_errors: Counter[str] = Counter()
        self.queries = 0
        self.query_errors: Counter[str] = Counter()
        self.not_found = 0
        # Per query kind: (seconds since the load started, call duration) of every call.
        self.latencies: dict[str, list[tuple[float, float]]] = {q: [] for q in self.query_kinds}
        self.began = time.monotonic()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._upload_loop, name="upload", daemon=True)] + [
            threading.Thread(target=self._query_loop, args=(k,), name=f"query-{k}", daemon=True)
            for k in range(2)
        ]

    def start(self) -> None:
        """The timed minutes begin (after any preload)."""
        self.began = time.monotonic()
        for thread in self.threads:
            thread.start()

    def join(self, timeout: float = 60.0) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout)

    def _batch(self, rng: random.Random, first: int, size: int = 0) -> list[ve.ViewEvent]:
        """Fresh events: media by a 1/rank popularity, times within the last two days."""
        now = time.time()
        events = []
        for n in range(first, first + (size or self.batch_size)):
            media = min(self.media, int(self.media ** rng.random()))
            seconds = now - rng.random() * 2 * 86400
            events.append(
                ve.ViewEvent(
                    event_id=f"soak-{self.seed}-{n}",
                    media_id=media,
                    user_id=rng.randint(1, self.users),
                    event_type=rng.choice(EVENT_TYPES),
                    event_time=Timestamp(seconds=int(seconds), nanos=int(seconds % 1 * 1e9)),
                )
            )
        return events

    def preload(self, events: int) -> dict[int, int]:
        """Upload `events` as fast as ingest takes them (before the paced load starts); the
        offsets just past them, per partition, for a wait until the consumers applied them."""
        bar = tqdm(total=events, desc="preload", unit="ev", unit_scale=True, leave=False)
        with grpc.insecure_channel(
            self.drill.config.ingest_address, options=CHANNEL_OPTIONS
        ) as channel:
            while self.uploaded < events:
                size = min(self.batch_size, events - self.uploaded)
                batch = self._batch(self._rng, self.uploaded, size)
                self._stored(upload(channel, batch, self.batch_size, timeout=60).positions)
                self.uploaded += size
                bar.update(size)
        bar.close()
        self.preloaded = self.uploaded
        return dict(self.ends)

    def _stored(self, positions: Iterable[ve.PartitionOffset]) -> None:
        """Move `ends` past an upload's stored events (a new dict: `lag` reads it from the
        main thread while the upload thread writes)."""
        ends = dict(self.ends)
        for p in positions:
            ends[p.partition] = max(ends.get(p.partition, 0), p.offset)
        self.ends = ends

    def _upload_loop(self) -> None:
        rng = self._rng
        began = time.monotonic()
        with grpc.insecure_channel(
            self.drill.config.ingest_address, options=CHANNEL_OPTIONS
        ) as channel:
            while not self.stop.is_set():
                try:
                    summary = upload(
                        channel, self._batch(rng, self.uploaded), self.batch_size, timeout=60
                    )
                    self.uploaded += self.batch_size
                    self._stored(summary.positions)
                except grpc.RpcError as error:
                    self.upload_errors[error.code().name] += 1
                # Pace to `rate`: wait until this many events are due (or the soak ends).
                self.stop.wait(
                    max(
                        0.0, began + (self.uploaded - self.preloaded) / self.rate - time.monotonic()
                    )
                )

    def _query_loop(self, k: int) -> None:
        rng = random.Random(self.seed * 100 + k)
        config = self.drill.config
        with QueryClient(config.stats_address, config.recommender_address) as client:
            every: dict[str, Callable[[], object]] = {
                "stats": lambda: client.media_stats(self._media(rng)),
                "trend": lambda: client.media_trend(self._media(rng), *self._day(), "hour"),
                "top": lambda: client.top_media(*self._day(), "view-time", 10),
                "similar": lambda: client.similar_media(self._media(rng), 10),
                "recommend": lambda: client.recommend(rng.randint(1, self.users), 10),
            }
            calls = [(name, every[name]) for name in self.query_kinds]
            turn = 0
            while calls and not self.stop.is_set():
                name, call = calls[turn % len(calls)]
                called = time.monotonic()
                try:
                    call()
                except grpc.RpcError as error:
                    if error.code() == grpc.StatusCode.NOT_FOUND:
                        with self._lock:
                            self.not_found += 1
                    else:
                        with self._lock:
                            self.query_errors[error.code().name] += 1
                done = time.monotonic()
                with self._lock:
                    self.queries += 1
                    self.latencies[name].append((called - self.began, done - called))
                turn += 1

    def lag(self, name: str) -> int | None:
        """Events stored but not yet applied by consumer `name` (None: no answer). A consumer
        that falls behind takes full-size batches, and its batch in flight grows with them:
        the RSS of a consumer whose lag keeps growing measures its backlog, not a leak."""
        address = getattr(self.drill.config, f"{name}_address")
        applied = stack.position(name, address)
        if applied is None:
            return None
        return sum(max(0, end - applied.get(p, 0)) for p, end in self.ends.items())

    def _media(self, rng: random.Random) -> int:
        return min(self.media, int(self.media ** rng.random()))

    @staticmethod
    def _day() -> tuple[datetime, datetime]:
        end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        return end - timedelta(days=1), end


def preload(load: Load, events: int) -> None:
    """The first part of the warm-up: a state larger than every bounded cache, and the
    consumers through full-size batches, before the minutes are timed. Without it the first
    minutes measure caches filling (the RocksDB block cache alone takes about three minutes at
    3,000 events/s), and the rule after the warm-up would judge a cold start, not a leak."""
    began = time.monotonic()
    ends = load.preload(events)
    uploaded = time.monotonic() - began
    for name in ("stats", "recommender"):
        stack.wait_applied(name, getattr(load.drill.config, f"{name}_address"), ends, 1800)
    print(
        f"preloaded {events:,} events: uploaded in {uploaded:.0f} s, applied by both consumers "
        f"after {time.monotonic() - began:.0f} s",
        flush=True,
    )


RSS_SAMPLE_S = 1.0  # how often each process's RSS is read; the table gives each minute's peak


def _higher(peak: float | None, value: float | None) -> float | None:
    return value if peak is None else peak if value is None else max(peak, value)


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drills.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--warmup-minutes", type=int, default=2)
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.15,
        help="largest RSS growth after the warm-up (0.15 = 15 %%)",
    )
    parser.add_argument(
        "--preload",
        type=int,
        default=2_000_000,
        help="events uploaded at full speed, and applied by both consumers, before the timed "
        "minutes start (0: start cold)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=2_000,
        help="events uploaded per second (at 3,000 the recommender fell behind on a 2-core "
        "machine that also runs the broker, ingest, stats and this drill's clients)",
    )
    parser.add_argument("--batch-size", type=int, default=2_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--media", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep broker data and state")
    parser.add_argument(
        "--queries",
        default="stats,trend,top,similar,recommend",
        help="comma-separated query RPCs the two query threads call in turn (empty: none)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the drill's services (e.g. consume_batch_max=5000); repeatable",
    )
    args = parser.parse_args(argv)
    if args.minutes < args.warmup_minutes + 2 or args.warmup_minutes < 1:
        parser.error("--minutes must exceed --warmup-minutes (at least 1) by 2 or more")

    workdir = stack.run_dir("soak")
    print(
        f"soak drill: {args.minutes} min at {args.rate:.0f} events/s, work dir {workdir}",
        flush=True,
    )
    overrides = dict(item.split("=", 1) for item in args.set)
    drill = stack.Stack(workdir, **overrides)
    names = list(drill.services)
    samples: dict[str, list[float | None]] = {name: [] for name in (*names, "broker")}
    last_lags: dict[str, int | None] = {}  # each consumer's lag at the last minute
    problems: list[str] = []
    keep = args.keep
    load: Load | None = None
    try:
        drill.start()
        load = Load(
            drill, args.rate, args.batch_size, args.users, args.media, args.seed, args.queries
        )
        if args.preload:
            preload(load, args.preload)
        load.start()
        consumers = [n for n in names if n != "ingest"]
        print(
            f"{'minute':>6} {'uploaded':>11} {'queries':>9} {'errors':>6} "
            + " ".join(f"{n + ' MiB':>15}" for n in (*names, "broker"))
            + " "
            + " ".join(f"{n + ' lag':>15}" for n in consumers),
            flush=True,
        )
        began = time.monotonic()
        bar = tqdm(
            total=args.minutes * 60,
            desc="soak",
            unit="s",
            leave=False,
            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s {postfix}",
        )
        for minute in range(1, args.minutes + 1):
            tick = began + 60 * minute
            pids = {n: drill.services[n].pid for n in names}
            pids["broker"] = drill.broker.pid()
            peaks: dict[str, float | None] = dict.fromkeys(pids)
            while (left := tick - time.monotonic()) > 0:
                # RSS every second, the minute's peak kept: one sample a minute lands at a random
                # point of a consumer's batch cycle (tens of MiB apart), and comparing one such
                # sample with the highest of eight later ones is biased upwards.
                for name, pid in pids.items():
                    peaks[name] = _higher(peaks[name], rss_mb(pid))
                load.stop.wait(min(left, RSS_SAMPLE_S))  # sampling cadence, not a wait for state
                bar.n = min(time.monotonic() - began, bar.total)
                bar.set_postfix_str(
                    f"{(load.uploaded - load.preloaded) / max(1.0, bar.n):,.0f} ev/s, "
                    f"{load.queries / max(1.0, bar.n):,.0f} q/s"
                )
            for name in pids:
                samples[name].append(peaks[name])
            lags = {n: load.lag(n) for n in consumers}
            last_lags.update(lags)
            errors = sum(load.query_errors.values()) + sum(load.upload_errors.values())
            tqdm.write(
                f"{minute:>6} {load.uploaded:>11,} {load.queries:>9,} {errors:>6} "
                + " ".join(f"{_mb(samples[n][-1]):>15}" for n in (*names, "broker"))
                + " "
                + " ".join(f"{_mb(lags[n]):>15}" for n in consumers)
            )
            for name in names:
                process = drill.services[name].process
                if process is None or process.poll() is not None:
                    problems.append(f"{name} exited before minute {minute}")
                elif not drill.services[name].serving():
                    # On a loaded machine a health check can miss its 1 s deadline: say so, but
                    # only a dead process fails the soak (its log says why it stopped serving).
                    tqdm.write(f"       {name}: no SERVING answer within 1 s at minute {minute}")
        bar.close()
    except BaseException as error:
        problems.append(f"drill aborted: {error!r}")
        keep = True
        if not isinstance(error, Exception):
            raise
    finally:
        if load is not None:
            load.join()
        drill.close(remove_data=not keep)
        if keep:
            print(f"kept: {workdir}")
    problems += kept_up(last_lags, args.rate)
    return report(samples, names, load, problems, args)


@dataclass(frozen=True)
class Flatness:
    """One service's RSS series judged after the warm-up (MiB)."""

    at_warmup: float  # peak RSS in the warm-up's last minute
    first_half: float  # highest RSS in the first half of the minutes after the warm-up
    second_half: float  # highest in the second half

    @property
    def growth(self) -> float:
        """The second half's peak over the first half's (judged, with `since_warmup`)."""
        return self.second_half / self.first_half - 1

    @property
    def since_warmup(self) -> float:
        """The peak after the warm-up over the RSS at its end (judged, with `growth`)."""
        return max(self.first_half, self.second_half) / self.at_warmup - 1


def flatness(series: list[float], warmup: int) -> Flatness:
    """Judge minutes warmup+1.. of `series` (each minute's peak RSS; at least two after the warm-up;
    an odd count gives the middle minute to the second half)."""
    after = series[warmup:]
    if warmup < 1 or len(after) < 2:
        raise ValueError("need the warm-up's last minute and two minutes after it")
    half = len(after) // 2
    return Flatness(series[warmup - 1], max(after[:half]), max(after[half:]))


def kept_up(lags: dict[str, int | None], rate: float) -> list[str]:
    """A consumer whose backlog at the end exceeds a minute of the upload is not in a steady
    state: its batches are all full-size and its memory is that of an overload, so the rule on
    memory would judge the machine's capacity, not a leak. The soak then fails with that reason
    (lower --rate, or fewer other loads on the machine)."""
    return [
        f"{name} fell behind: {lag:,} events not applied at the end, more than a minute of the "
        f"upload ({rate * 60:,.0f}); its memory is that of a growing backlog"
        for name, lag in lags.items()
        if lag is not None and lag > rate * 60
    ]


def print_latencies(latencies: dict[str, list[tuple[float, float]]]) -> None:
    """Calls, p50, p99 and max per query kind and minute: a query path that slows down as the
    state grows shows here long before it shows in the totals."""
    print(f"{'query':<10} {'minute':>6} {'calls':>7} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for name, calls in latencies.items():
        by_minute: dict[int, list[float]] = {}
        for at, seconds in calls:
            by_minute.setdefault(int(at // 60) + 1, []).append(seconds * 1000)
        for minute, values in sorted(by_minute.items()):
            p50, p99 = np.percentile(values, [50, 99]).tolist()
            print(
                f"{name:<10} {minute:>6} {len(values):>7,} {p50:>9.1f} {p99:>9.1f} "
                f"{max(values):>9.1f}"
            )


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def report(
    samples: dict[str, list[float | None]],
    names: list[str],
    load: Load | None,
    problems: list[str],
    args: argparse.Namespace,
) -> int:
    print(f"\n== soak: {args.minutes} min, {args.rate:.0f} events/s asked ==")
    if load is not None:
        print(
            f"uploaded {load.uploaded:,} events (preload {load.preloaded:,}, then "
            f"{(load.uploaded - load.preloaded) / (args.minutes * 60):,.0f}/s), "
            f"{load.queries:,} queries ({load.queries / (args.minutes * 60):,.0f}/s), "
            f"{load.not_found:,} NOT_FOUND; errors: upload {dict(load.upload_errors)}, "
            f"queries {dict(load.query_errors)}"
        )
        if load.query_errors or load.upload_errors:
            problems.append("RPC errors (see above)")
        print_latencies(load.latencies)
    w = args.warmup_minutes
    if load is not None:
        plan = memory_plan(load.drill.config)
        print(
            f"memory budget of each consuming service: {plan.budget_mb} MiB (RocksDB block "
            f"cache {plan.block_cache_mb} MiB + up to 3 x {plan.write_buffer_mb} MiB memtables, "
            f"Kafka fetch {FETCH_HELD_RESPONSES * plan.fetch_max_bytes >> 20} MiB, own cache {plan.service_cache_mb} MiB)"
        )
    print(
        f"{'service':<12} {'peak at min ' + str(w):>14} {'max 1st half':>13} "
        f"{'max 2nd half':>13} {'growth':>7} {'since warm-up':>14}"
    )
    for name in names:
        series = samples[name]
        if len(series) < w + 2 or any(v is None for v in series[w - 1 :]):
            problems.append(f"{name}: no RSS for every minute (died?)")
            continue
        judged = flatness([float(v or 0.0) for v in series], w)
        over = max(judged.growth, judged.since_warmup) > args.tolerance
        print(
            f"{name:<12} {judged.at_warmup:>14,.0f} {judged.first_half:>13,.0f} "
            f"{judged.second_half:>13,.0f} {judged.growth:>6.1%} {judged.since_warmup:>13.1%}"
            f"{'  > tolerance' if over else ''}"
        )
        if judged.since_warmup > args.tolerance:
            problems.append(
                f"{name}: RSS grew {judged.since_warmup:.1%} after the warm-up "
                f"(tolerance {args.tolerance:.0%})"
            )
        if judged.growth > args.tolerance:
            problems.append(
                f"{name}: RSS grew {judged.growth:.1%} from the first to the second half after "
                f"the warm-up (tolerance {args.tolerance:.0%})"
            )
    for problem in problems:
        print(f"problem: {problem}")
    print("PASS: memory flat after the warm-up" if not problems else "FAIL")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
