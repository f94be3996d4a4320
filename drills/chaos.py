"""`make chaos`: kill -9 services and the broker during a multi-million-event upload, then check
every media item's totals and the recommender's statistics against a brute force over the file.

    python -m drills.chaos [--events 3000000] [--service-kills 30] [--broker-kills 2] [--seed 7]

How it runs (all on its own broker and services, see drills.stack):
* A generated noisy file (viewevents_tools.generator, cached under .data/drills/) is uploaded
  with the resumable client (UploadStream, re-sending unacknowledged batches after a break) in
  a thread. The upload is cut in kills + 1 parts (one resumable upload each); part k + 1 is
  released once kill k recovered, so every kill lands mid-upload whatever the machine's speed
  (placed by progress, not time).
* Kill k waits until every component is SERVING and the acknowledged upload is half-way
  through part k (released after the previous recovery, so the upload is running), then
  kill -9s its victim (a seeded shuffle of the service kills, spread at random over ingest,
  stats and recommender, and the broker kills), restarts it on the same
  ports, data and consumer group, and times kill -> SERVING again (for the broker: until it
  answers and all three services are SERVING).
* After the upload and the kills: wait until both consumers applied the topic's end offsets,
  compare GetMediaStats of every media id with the brute force, stop the recommender cleanly
  and compare N, S, Q, n of every item and D, c of every pair read from its RocksDB (the
  history cap is raised so pair statistics are exact, as in tests/e2e).
Exits 1 when anything was lost or double counted, a statistic differs, the upload failed or a
component did not recover in time.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from aiokafka import AIOKafkaConsumer, TopicPartition
from tqdm import tqdm

from drills import checks, stack
from drills.oracle import brute_force, uploaded_events
from viewevents.v1 import ingest_service_pb2 as ingest_pb
from viewevents.v1 import view_event_pb2 as ve
from viewevents_client.uploads import CHANNEL_OPTIONS, UploadTotals, upload_resumable
from viewevents_tools.generator import generate

SERVICES = ("ingest", "stats", "recommender")


def event_file(events: int, seed: int, users: int, media: int, noise: float) -> Path:
    """The generated file, made once per parameter set and cached (generation is seeded)."""
    path = stack.DRILLS_DATA / f"events-{events}-s{seed}-u{users}-m{media}-n{noise}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        generate(
            str(partial), events, seed=seed, users=users, media=media, noise=noise, progress=True
        )
        partial.rename(path)
    return path


class GatedUpload:
    """The resumable upload of a file in a thread, let through in parts by the kill loop.

    Each part is one resumable upload (UploadStream, re-sends after breaks); part p starts once
    the kill loop released it and part p - 1 is acknowledged in full. Gating between parts,
    not inside the request stream, keeps the client's own window logic untouched."""

    def __init__(
        self, path: Path, address: str, part_size: int, batch_size: int, total_lines: int
    ) -> None:
        self.path = path
        self.address = address
        self.batch_size = batch_size
        self.part_size = part_size
        self._released = part_size
        self._cond = threading.Condition()
        self._base = 0  # events of the parts already acknowledged in full
        self._sent = 0  # events of the current part pulled from the file
        self._acked_batches = 0  # current part: highest acknowledged sequence + 1 (in order)
        self.totals = UploadTotals()
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.bar = tqdm(
            total=total_lines, desc="upload (acked)", unit="ev", unit_scale=True, smoothing=0.05
        )
        self.thread = threading.Thread(target=self._run, name="upload", daemon=True)

    @property
    def acked(self) -> int:
        """Events of the file acknowledged so far (a prefix: batches are acked in order)."""
        return self._base + min(self._acked_batches * self.batch_size, self._sent)

    def release(self, limit: int | None) -> None:
        """Let the upload go on up to about event `limit` (None: to the end)."""
        with self._cond:
            self._released = limit if limit is not None else 2**62
            self._cond.notify_all()

    def _part(self, source: Iterator[ve.ViewEvent]) -> Iterator[ve.ViewEvent]:
        for event in itertools.islice(source, self.part_size):
            self._sent += 1
            yield event

    def _on_ack(self, ack: ingest_pb.UploadAck) -> None:
        before = self.acked
        self._acked_batches = max(self._acked_batches, ack.sequence + 1)
        self.bar.update(self.acked - before)

    def _run(self) -> None:
        source = uploaded_events(str(self.path))
        try:
            for part in itertools.count():
                with self._cond:
                    while part * self.part_size >= self._released:
                        self._cond.wait()
                self._sent = self._acked_batches = 0
                totals = upload_resumable(
                    lambda: grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS),
                    self._part(source),
                    batch_size=self.batch_size,
                    window=16,
                    max_attempts=60,  # consecutive failures without progress: ~15 min
                    on_ack=self._on_ack,
                )
                for name in ("received", "accepted", "rejected", "requests", "reconnects"):
                    setattr(self.totals, name, getattr(self.totals, name) + getattr(totals, name))
                sent = self._sent
                self._base += sent
                self._sent = self._acked_batches = 0
                if sent < self.part_size:
                    return
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            self.error = error
        finally:
            self.done.set()
            self.bar.close()


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    """The topic's end offsets, read from the broker itself (the ingest service created the
    topic with `partitions` partitions). Never empty: an empty target would make the wait for
    the consumers vacuous."""

    async def read() -> dict[int, int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
        await consumer.start()
        try:
            ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
            return {tp.partition: offset for tp, offset in ends.items()}
        finally:
            await consumer.stop()

    ends = asyncio.run(read())
    if len(ends) != partitions or not sum(ends.values()):
        raise RuntimeError(f"end offsets of {topic}: {ends}")
    return ends


def kill_schedule(service_kills: int, broker_kills: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    victims = [rng.choice(SERVICES) for _ in range(service_kills)] + ["broker"] * broker_kills
    rng.shuffle(victims)
    return victims


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drills.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=3_000_000, help="lines of the file")
    parser.add_argument("--service-kills", type=int, default=30)
    parser.add_argument("--broker-kills", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7, help="file contents and kill order")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--media", type=int, default=2_000)
    parser.add_argument("--noise", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=2_000)
    parser.add_argument(
        "--recovery-timeout",
        type=float,
        default=300.0,
        help="seconds a component may take from kill to SERVING",
    )
    parser.add_argument(
        "--no-pairs", action="store_true", help="compare only the recommender's item statistics"
    )
    parser.add_argument("--keep", action="store_true", help="keep broker data and state")
    args = parser.parse_args(argv)

    began = time.monotonic()
    path = event_file(args.events, args.seed, args.users, args.media, args.noise)
    workdir = stack.run_dir("chaos")
    print(f"chaos drill: {path.name}, work dir {workdir}", flush=True)
    drill = stack.Stack(workdir, recommender_history_cap=1_000_000)
    schedule = kill_schedule(args.service_kills, args.broker_kills, args.seed)
    recoveries: dict[str, list[float]] = {name: [] for name in (*SERVICES, "broker")}
    problems: list[str] = []
    verdicts: list[checks.Verdict] = []
    upload: GatedUpload | None = None
    records: int | None = None  # in the view topic at the end
    keep = args.keep
    try:
        drill.start()
        part_size = -(-args.events // (len(schedule) + 1))
        upload = GatedUpload(
            path, drill.config.ingest_address, part_size, args.batch_size, args.events
        )
        upload.thread.start()
        for k, victim in enumerate(schedule):
            mark = k * part_size + part_size // 2

            def ready(mark: int = mark, upload: GatedUpload = upload) -> bool:
                return upload.error is not None or (
                    upload.acked >= mark and drill.all_serving() and drill.broker.alive()
                )

            stack.wait_until(
                ready,
                args.recovery_timeout,
                f"kill {k + 1}: upload at {mark} and all SERVING",
                interval=0.1,
            )
            if upload.error is not None:
                raise RuntimeError(f"upload failed: {upload.error!r}")
            killed_at, acked_at_kill = time.monotonic(), upload.acked
            if victim == "broker":
                drill.broker.kill()
                drill.broker.start()
                stack.wait_until(
                    drill.all_serving,
                    args.recovery_timeout,
                    "all services SERVING after the broker restart",
                )
            else:
                service = drill.services[victim]
                service.kill()
                service.spawn()
                service.wait_serving(args.recovery_timeout)
            recoveries[victim].append(time.monotonic() - killed_at)
            # The next part only after the recovery: the next kill then lands half-way through
            # a part, on a running upload, however long this recovery took.
            upload.release((k + 2) * part_size)
            tqdm.write(
                f"kill {k + 1}/{len(schedule)}: {victim} at {acked_at_kill:,} acked "
                f"events, SERVING again after {recoveries[victim][-1]:.1f} s"
            )
        upload.release(None)
        stack.wait_until(upload.done.is_set, 3600, "upload finished", interval=0.5)
        if upload.error is not None:
            problems.append(f"upload failed: {upload.error!r}")
        limit = None if upload.error is None else upload.acked
        ends = end_offsets(
            drill.broker.bootstrap, drill.config.view_topic, drill.config.topic_partitions
        )
        records = sum(ends.values())
        truth = brute_force(str(path), drill.config, limit)
        for name in ("stats", "recommender"):
            stack.wait_applied(name, getattr(drill.config, f"{name}_address"), ends, 1800)
        verdicts.append(
            checks.check_stats(drill.config.stats_address, truth, drill.config.heartbeat_seconds)
        )
        code = drill.services["recommender"].stop()
        if code != 0:
            problems.append(f"recommender exited {code} on SIGTERM")
        verdicts.append(
            checks.check_recommender(
                Path(drill.config.recommender_state_dir), truth, check_pairs=not args.no_pairs
            )
        )
    except BaseException as error:
        problems.append(f"drill aborted: {error!r}")
        keep = True  # the evidence stays for a look
        if not isinstance(error, Exception):
            raise
    finally:
        drill.close(remove_data=not keep)
        elapsed = time.monotonic() - began
        print_report(schedule, recoveries, upload, records, verdicts, problems, elapsed, args)
        if keep:
            print(f"kept: {workdir}")
    passed = not problems and len(verdicts) == 2 and all(v.passed for v in verdicts)
    print("PASS: 0 lost, 0 double counted, every statistic equal" if passed else "FAIL")
    return 0 if passed else 1


def print_report(
    schedule: list[str],
    recoveries: dict[str, list[float]],
    upload: GatedUpload | None,
    records: int | None,
    verdicts: list[checks.Verdict],
    problems: list[str],
    elapsed: float,
    args: argparse.Namespace,
) -> None:
    done = sum(len(v) for v in recoveries.values())
    print(
        f"\n== chaos: {args.events:,} lines, seed {args.seed}, {done}/{len(schedule)} kills, "
        f"{elapsed / 60:.1f} min =="
    )
    print(f"{'component':<12} {'kills':>5} {'longest recovery':>17} {'median':>8}")
    for name, times in recoveries.items():
        ordered = sorted(times)
        longest = f"{ordered[-1]:.1f} s" if ordered else "-"
        median = f"{ordered[len(ordered) // 2]:.1f} s" if ordered else "-"
        print(f"{name:<12} {len(times):>5} {longest:>17} {median:>8}")
    if upload is not None:
        t = upload.totals
        print(
            f"\nupload: {t.received:,} events acknowledged by ingest ({t.accepted:,} accepted, "
            f"{t.rejected:,} rejected), {t.requests:,} batches, {t.reconnects} reconnects"
        )
        if records is not None:
            print(
                f"view topic: {records:,} records, {records - t.accepted:,} more than accepted "
                "(copies written before a break and re-sent; consumers drop them by event id)"
            )
    if verdicts:
        print(
            f"\n{'consumer':<12} {'must count':>11} {'counted':>11} {'lost':>6} "
            f"{'double':>7} {'other stats off':>16}"
        )
        for v in verdicts:
            print(
                f"{v.component:<12} {v.expected:>11,} {v.counted:>11,} {v.lost:>6,} "
                f"{v.double:>7,} {v.mismatches:>16,}"
            )
        for v in verdicts:
            for note in v.notes:
                print(f"  {v.component}: {note}")
    for problem in problems:
        print(f"problem: {problem}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
