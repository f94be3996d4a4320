"""The stats service driven in process (no Kafka): random events, a brute-force oracle over them,
and loading them through the real processor into a real RocksDB store in random batch cuts."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from stats_service.aggregation import Columns
from stats_service.processor import StatsProcessor
from stats_service.rollups import BucketVersions
from viewevents.state.store import StateStore
from viewevents.state.transaction import Transaction

HEARTBEAT = 30
BASE = 1_767_225_600  # 2026-01-01T00:00:00Z


@dataclass(frozen=True)
class Event:
    event_id: str
    media: int
    user: int
    kind: int
    seconds: int


def random_events(
    rng: random.Random, count: int, media: int = 25, users: int = 60, late_fraction: float = 0.05
) -> list[Event]:
    """Mostly time-ordered events over three days, some very late, on few media and users so
    that keys collide within and across batches."""
    out: list[Event] = []
    clock = BASE
    for i in range(count):
        clock += rng.randint(0, 90)
        seconds = clock
        if rng.random() < late_fraction:
            seconds -= rng.randint(3600, 20 * 86400)  # late: hours to weeks behind
        out.append(
            Event(
                f"e{i}",
                rng.randint(1, media),
                rng.randint(1, users),
                rng.choice([1, 2, 2, 2, 2, 3, 4]),
                seconds,
            )
        )
    return out


class Brute:
    """The expected answers, from first principles."""

    def __init__(self, partitioned: dict[int, list[Event]], retention_seconds: int) -> None:
        self.totals: dict[int, dict] = {}
        self.kept: list[Event] = []
        for events in partitioned.values():
            high = None
            for e in events:
                high = e.seconds if high is None else max(high, e.seconds)
                t = self.totals.setdefault(
                    e.media,
                    dict(
                        view_time=0,
                        starts=0,
                        stops=0,
                        ends=0,
                        users=set(),
                        first=e.seconds,
                        last=e.seconds,
                    ),
                )
                t["view_time"] += HEARTBEAT if e.kind == 2 else 0
                t["starts"] += e.kind == 1
                t["stops"] += e.kind == 3
                t["ends"] += e.kind == 4
                t["users"].add(e.user)
                t["first"] = min(t["first"], e.seconds)
                t["last"] = max(t["last"], e.seconds)
                if retention_seconds <= 0 or e.seconds >= high - retention_seconds:
                    self.kept.append(e)

    def trend(self, media: int, size: int, start: int, end: int) -> dict[int, list]:
        out: dict[int, list] = {}
        for e in self.kept:
            if e.media == media and start <= e.seconds < end:
                b = out.setdefault(e.seconds - e.seconds % size, [0, 0, 0, 0, set()])
                b[0] += HEARTBEAT if e.kind == 2 else 0
                b[1] += e.kind == 1
                b[2] += e.kind == 3
                b[3] += e.kind == 4
                b[4].add(e.user)
        return {s: [*b[:4], len(b[4])] for s, b in out.items()}

    def viewers(self, media: int, start: int, end: int) -> int:
        return len({e.user for e in self.kept if e.media == media and start <= e.seconds < end})

    def top(self, start: int, end: int) -> dict[int, tuple[int, int, int]]:
        acc: dict[int, list] = defaultdict(lambda: [0, 0, set()])
        for e in self.kept:
            if start <= e.seconds < end:
                acc[e.media][0] += HEARTBEAT if e.kind == 2 else 0
                acc[e.media][1] += e.kind == 1
                acc[e.media][2].add(e.user)
        return {m: (v, s, len(u)) for m, (v, s, u) in acc.items()}


def load(
    store: StateStore,
    partitioned: dict[int, list[Event]],
    rng: random.Random,
    retention_days: int = 0,
    processor: StatsProcessor | None = None,
) -> StatsProcessor:
    """Apply each partition's events in random batch cuts, several partitions per commit
    (with `processor`, that one: e.g. one that bumps rollup versions)."""
    processor = processor or StatsProcessor(HEARTBEAT, retention_days)
    cursors = {p: 0 for p in partitioned}
    while any(cursors[p] < len(partitioned[p]) for p in partitioned):
        txn = Transaction(store)
        for p, events in partitioned.items():
            take = rng.choice([0, 1, 3, 17, 60, 250])
            chunk = events[cursors[p] : cursors[p] + take]
            cursors[p] += len(chunk)
            if chunk:
                processor.apply_columns(
                    p, Columns.from_tuples((e.media, e.user, e.kind, e.seconds) for e in chunk), txn
                )
        txn.commit()
        processor.committed()  # as the shared consumer does after each commit
    return processor


def partition(events: list[Event], partitions: int) -> dict[int, list[Event]]:
    out: dict[int, list[Event]] = {p: [] for p in range(partitions)}
    for e in events:
        out[e.user % partitions].append(e)  # a user's events share a partition, as in Kafka
    return out


@dataclass
class LoadedState:
    """A store holding random events applied by the real processor, with the bucket versions
    its rollups follow, the events per partition and the random source to go on with."""

    store: StateStore
    versions: BucketVersions
    partitioned: dict[int, list[Event]]
    rng: random.Random


def loaded_state(path: Path, seed: int, count: int, partitions: int) -> LoadedState:
    """`count` random events (`seed`) over `partitions`, applied to a store under `path`."""
    rng = random.Random(seed)
    partitioned = partition(random_events(rng, count), partitions)
    store = StateStore(str(path / "db"))
    versions = BucketVersions()
    load(store, partitioned, rng, processor=StatsProcessor(HEARTBEAT, 0, versions))
    return LoadedState(store, versions, partitioned, rng)
