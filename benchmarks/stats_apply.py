"""The stats apply in process, without Kafka or gRPC: CPU seconds per event, keys and bytes
written per event, and bytes on disk, for two data shapes side by side.

Why: the consume benchmarks measure the whole service on a machine shared with other work;
this isolates `StatsProcessor.apply_columns` (plus the RocksDB commit) so a change to the
state layout can be compared before/after on the same events, and profiled with py-spy.

Shapes: "session" is the generator's session-shaped data (few media, many events per
media-hour and viewer-day); "uniform" is the ingest benchmark's synthetic upload (events
uniform over 10k media x 200k users x 7 days: nearly every event starts a new media-hour row
and viewer-day).

    python -m benchmarks.stats_apply [--events N] [--shapes session,uniform] [--batch 20000]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from stats_service.aggregation import Columns
from stats_service.processor import StatsProcessor
from viewevents.state.store import StateStore
from viewevents.state.transaction import Transaction

PARTITIONS = 8
REPO = Path(__file__).resolve().parent.parent
WORKDIR = REPO / ".data" / "bench"


def uniform_columns(events: int, seed: int = 7) -> Columns:
    """The shape of benchmarks.ingest.synthetic_requests, drawn with numpy."""
    rng = np.random.default_rng(seed)
    now = int(time.time())
    kinds = np.array([1, 2, 2, 2, 2, 3, 4], np.int64)
    return Columns(
        rng.integers(1, 10_001, events),
        rng.integers(1, 200_001, events),
        kinds[rng.integers(0, len(kinds), events)],
        now - rng.integers(0, 7 * 86_400 + 1, events),
    )


def session_columns(events: int, seed: int = 1) -> Columns:
    """The generator's session-shaped events (cached file under .data/bench), valid ones only."""
    from viewevents_client.event_files import iter_file
    from viewevents_tools.generator import generate

    WORKDIR.mkdir(parents=True, exist_ok=True)
    path = WORKDIR / f"stats-apply-{events}-{seed}.jsonl"
    if not path.exists():
        generate(str(path), events, seed=seed, days=7)
    rows = [
        (e.media_id, e.user_id, e.event_type, e.event_time.seconds)
        for _, parsed in iter_file(str(path))
        if (e := parsed.event) is not None and e.media_id > 0 and 1 <= e.event_type <= 4
    ]
    rows.sort(key=lambda r: r[3])  # a stream arrives roughly in event-time order
    return Columns.from_tuples(rows)


def run(columns: Columns, batch: int, state: Path) -> dict[str, float]:
    """Apply `columns` in consumer-sized batches (split by partition as Kafka would)."""
    store = StateStore(str(state))
    processor = StatsProcessor()
    partition = columns.user % PARTITIONS
    keys = value_bytes = key_bytes = 0
    cpu = apply_cpu = 0.0
    wall = time.perf_counter()
    for at in range(0, len(columns), batch):
        part = slice(at, at + batch)
        txn = Transaction(store)
        began = time.process_time()
        for p in range(PARTITIONS):
            mine = partition[part] == p
            if not mine.any():  # the consumer applies only partitions the batch holds
                continue
            processor.apply_columns(
                p,
                Columns(
                    columns.media[part][mine],
                    columns.user[part][mine],
                    columns.kind[part][mine],
                    columns.seconds[part][mine],
                ),
                txn,
            )
        applied = time.process_time()
        pending = txn._pending  # noqa: SLF001 # measuring only: what the commit will write
        keys += len(pending)
        key_bytes += sum(map(len, pending))
        value_bytes += sum(len(v) for v in pending.values() if v is not None)
        before_commit = time.process_time()
        txn.commit()
        done = time.process_time()
        apply_cpu += applied - began
        cpu += (applied - began) + (done - before_commit)
    wall = time.perf_counter() - wall
    store.db.flush()
    store.close()
    disk = sum(f.stat().st_size for f in state.rglob("*") if f.is_file())
    n = len(columns)
    return {
        "events": n,
        "cpu_us_per_event": 1e6 * cpu / n,
        "apply_cpu_us_per_event": 1e6 * apply_cpu / n,
        "events_per_cpu_second": n / cpu,
        "wall_events_per_second": n / wall,
        "keys_per_event": keys / n,
        "written_bytes_per_event": (key_bytes + value_bytes) / n,
        "disk_bytes_per_event": disk / n,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--shapes", default="session,uniform")
    parser.add_argument("--batch", type=int, default=20_000, help="events per transaction")
    args = parser.parse_args(argv)
    makers = {"session": session_columns, "uniform": uniform_columns}
    for shape in args.shapes.split(","):
        columns = makers[shape](args.events)
        state = Path(tempfile.mkdtemp(prefix=f"stats-apply-{shape}-"))
        try:
            result = run(columns, args.batch, state / "db")
        finally:
            shutil.rmtree(state, ignore_errors=True)
        print(shape, " ".join(f"{k}={v:,.2f}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()
