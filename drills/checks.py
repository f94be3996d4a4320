"""What the services hold, compared with the brute force (drills.oracle), counted in events.

"lost" is what is below the brute force, "double counted" what is above it, both in events
(starts, stops, ends, waypoints); other statistics that differ (unique viewers, event-time
range, the recommender's N, Q, n, D, c) are counted as mismatches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from drills.oracle import MAX_DENSE_MEDIA, Truth
from recommender_service import key_layout as keys
from viewevents.state.codecs import BIG_U64
from viewevents.state.keys import partition_prefix
from viewevents.state.store import StateStore
from viewevents.v1 import stats_service_pb2 as stats_pb
from viewevents.v1 import stats_service_pb2_grpc as stats_grpc


@dataclass
class Verdict:
    """One consumer's accounting against the brute force."""

    component: str
    expected: int = 0  # events the brute force says must be counted
    counted: int = 0
    lost: int = 0
    double: int = 0
    mismatches: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, want: int, got: int) -> None:
        self.expected += want
        self.counted += got
        self.lost += max(0, want - got)
        self.double += max(0, got - want)

    def note(self, text: str) -> None:
        """A statistic other than an event count differs."""
        self.mismatches += 1
        self.remark(text)

    def remark(self, text: str) -> None:
        """An example for the report (the first ten are kept)."""
        if len(self.notes) < 10:
            self.notes.append(text)

    @property
    def passed(self) -> bool:
        return self.lost == 0 and self.double == 0 and self.mismatches == 0


def check_stats(address: str, truth: Truth, heartbeat_seconds: int) -> Verdict:
    """GetMediaStats for every media id from 1 to the highest expected one (an id the file
    never names must be NOT_FOUND) against the brute force."""
    verdict = Verdict("stats")
    viewers = truth.unique_viewers()
    highest = max(truth.media, default=0)
    with grpc.insecure_channel(address) as channel:
        stub = stats_grpc.StatsServiceStub(channel)
        for media in range(1, highest + 1):
            want = truth.media.get(media)
            try:
                got = stub.GetMediaStats(
                    stats_pb.GetMediaStatsRequest(media_id=media), timeout=30
                ).stats
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                got = None
            if want is None and got is None:
                continue
            w = (want.starts, want.waypoints, want.stops, want.ends) if want else (0, 0, 0, 0)
            g = (
                (got.starts, got.view_time_seconds // heartbeat_seconds, got.stops, got.ends)
                if got is not None
                else (0, 0, 0, 0)
            )
            for a, b in zip(w, g):
                verdict.add(a, b)
            if w != g:
                verdict.remark(f"media {media}: (starts, waypoints, stops, ends) {g} != {w}")
            if want is not None and got is not None:
                if got.unique_viewers != viewers[media]:
                    verdict.note(
                        f"media {media}: unique viewers {got.unique_viewers} != {viewers[media]}"
                    )
                if (got.first_event_time.seconds, got.last_event_time.seconds) != (
                    want.first,
                    want.last,
                ):
                    verdict.note(f"media {media}: event-time range differs")
                if got.view_time_seconds % heartbeat_seconds:
                    verdict.note(
                        f"media {media}: view time {got.view_time_seconds} s is not "
                        f"a whole number of waypoints"
                    )
    return verdict


def check_recommender(state_dir: Path, truth: Truth, check_pairs: bool = True) -> Verdict:
    """N, every item's S, Q, n and (unless `check_pairs` is off) every pair's D and c, read
    straight from the recommender's RocksDB after a clean stop."""
    verdict = Verdict("recommender")
    store = StateStore(str(state_dir))
    try:
        partitions = keys.partitions_in(store)
        users, items = keys.stored_items(store, partitions)
        if users != truth.users:
            verdict.note(f"N {users} != {truth.users}")
        want_items = truth.item_stats()
        for media in sorted(set(items) | set(want_items)):
            w = want_items.get(media, (0, 0, 0))
            g = items.get(media, (0, 0, 0))
            verdict.add(w[0], g[0])  # S: waypoints, i.e. events
            if w[1:] != g[1:]:
                verdict.note(f"media {media}: (Q, n) {g[1:]} != {w[1:]}")
            elif w[0] != g[0]:
                verdict.remark(f"media {media}: S {g[0]} != {w[0]}")
        if check_pairs:
            _check_pairs(store, partitions, truth, verdict, set(items) | set(want_items))
    finally:
        store.close()
    return verdict


def _check_pairs(
    store: StateStore, partitions: list[int], truth: Truth, verdict: Verdict, media_ids: set[int]
) -> None:
    size = max(media_ids, default=0) + 1
    if size > MAX_DENSE_MEDIA:
        verdict.remark(f"pair check skipped: media ids up to {size - 1}")
        return
    want_d, want_c = truth.pair_matrices(size)
    got_d = np.zeros_like(want_d)
    got_c = np.zeros_like(want_c)
    for partition in partitions:
        prefix = partition_prefix(partition) + keys.KIND_ROW
        cut = len(prefix)
        current: int | None = None
        chunks: list[bytes] = []

        def flush(item: int | None, chunks: list[bytes]) -> None:
            if item is None:
                return
            row = keys.aggregate_row(keys.decode_row(chunks))
            inside = row["j"] < size
            if not inside.all() or item >= size:
                verdict.note(f"item {item}: neighbours outside the file's media ids")
                return
            got_d[item, row["j"]] += row["d"]
            got_c[item, row["j"]] += row["c"]

        for key, value in store.scan_prefix(prefix):
            item = BIG_U64.unpack_from(key, cut)[0]
            if item != current:
                flush(current, chunks)
                current, chunks = item, []
            chunks.append(value)
        flush(current, chunks)
    for name, got, want in (("D", got_d, want_d), ("c", got_c, want_c)):
        below = int((got < want).sum())
        above = int((got > want).sum())
        if below or above:
            verdict.note(
                f"{name}: {below} pairs below, {above} above the brute force "
                f"(of {int((want > 0).sum())})"
            )
