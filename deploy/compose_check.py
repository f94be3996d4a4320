"""Client side of deploy/compose-check.sh: data, expectations and queries (stdlib only).

    python deploy/compose_check.py gen FILE                 a small event file (legacy format)
    python deploy/compose_check.py verify FILE ANSWERS ...  upload it, check stats + recommender
    python deploy/compose_check.py again ANSWERS ...        the same answers after a restart

Every service call goes through the project's own client, `viewevents` (upload with --tls-ca and
--token; stats/similar with --tls-ca --json). The expected numbers are computed here from the
file as written, not by project code. The stats and recommender replicas are listed in a file
(`--replicas`, one line each: service, container, hostname, host gRPC port, host metrics port,
state slot), and EACH replica is asked directly: every answer must be complete (all partitions)
and equal to the file's numbers, the partitions must be split over the replicas (each replica's
`viewevents_partition_owner` metrics), and each replica must have got answers from the others
(`viewevents_fanout_calls_total`, i.e. the peer calls over TLS work). Each check prints one line
`RESULT<TAB>step<TAB>detail` for the summary table; the exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

HEARTBEAT_SECONDS = 30  # VIEWEVENTS_HEARTBEAT_SECONDS default: view time per waypoint
MIN_CO_VIEWERS = 2  # VIEWEVENTS_RECOMMENDER_MIN_CO_VIEWERS default
PARTITIONS = 4  # VIEWEVENTS_TOPIC_PARTITIONS in deploy/docker-compose.yml
MEDIA = list(range(101, 107))
USERS = list(range(1001, 1061))


def gen(path: Path, seed: int = 7) -> None:
    """60 users, each watching 2-4 of 6 media: start, 1-6 waypoints, stop or end."""
    rng = random.Random(seed)
    base = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    lines = []
    for user in USERS:
        watched = rng.sample(MEDIA, rng.randint(2, 4))
        if 101 not in watched and rng.random() < 0.7:
            watched[0] = 101  # a clear favourite, so media 101 has many co-viewers
        at = base + timedelta(minutes=rng.randint(0, 60))
        for media in watched:
            kinds = ["streamstart"] + ["waypoint"] * rng.randint(1, 6)
            kinds.append(rng.choice(["streamstop", "streamend"]))
            for kind in kinds:
                at += timedelta(seconds=HEARTBEAT_SECONDS)
                lines.append(
                    {
                        "EventId": f"check-{user}-{media}-{len(lines)}",
                        "MediaId": media,
                        "UserId": user,
                        "EventType": kind,
                        "Timestamp": int(at.timestamp()),
                        "DateTime": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    }
                )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def expectations(path: Path) -> tuple[int, dict[int, dict[str, int]], dict[int, dict[int, float]]]:
    """From the file: event count, per-media totals, per-user waypoints per media."""
    totals: dict[int, Counter[str]] = defaultdict(Counter)
    viewers: dict[int, set[int]] = defaultdict(set)
    w: dict[int, Counter[int]] = defaultdict(Counter)
    events = 0
    for line in path.read_text().splitlines():
        event = json.loads(line)
        events += 1
        media, user, kind = int(event["MediaId"]), int(event["UserId"]), event["EventType"]
        totals[media][kind] += 1
        viewers[media].add(user)
        if kind == "waypoint":
            w[user][media] += 1
    stats = {
        m: {
            "starts": c["streamstart"],
            "stops": c["streamstop"],
            "ends": c["streamend"],
            "viewTimeSeconds": c["waypoint"] * HEARTBEAT_SECONDS,
            "uniqueViewers": len(viewers[m]),
        }
        for m, c in totals.items()
    }
    return events, stats, {u: dict(c) for u, c in w.items()}


def similar_expected(w: dict[int, dict[int, float]], media: int) -> list[tuple[int, int, float]]:
    """(media, co-viewers, cosine) best first, as docs/recommender-service.md defines them."""
    q = Counter[int]()
    d = Counter[int]()
    co = Counter[int]()
    for items in w.values():
        for item, value in items.items():
            q[item] += value * value
        if media in items:
            for item, value in items.items():
                if item != media:
                    d[item] += items[media] * value
                    co[item] += 1
    rows = [(j, co[j], d[j] / math.sqrt(q[media] * q[j])) for j in d if co[j] >= MIN_CO_VIEWERS]
    return sorted(rows, key=lambda r: (-round(r[2], 12), r[0]))


@dataclass(frozen=True)
class Replica:
    """One stats or recommender container, as compose-check.sh found it."""

    service: str
    container: str
    hostname: str
    port: int
    metrics_port: int
    slot: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def advertised(self) -> str:
        """What it sends its group: its hostname (the container id) with the container port."""
        return f"{self.hostname}:{CONTAINER_PORTS[self.service]}"


CONTAINER_PORTS = {"stats": 50052, "recommender": 50053}


def read_replicas(path: str) -> dict[str, list[Replica]]:
    found: dict[str, list[Replica]] = {"stats": [], "recommender": []}
    for line in Path(path).read_text().splitlines():
        service, container, hostname, port, metrics_port, slot = line.split()
        found[service].append(
            Replica(service, container, hostname, int(port), int(metrics_port), slot)
        )
    return found


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.args.viewevents, *argv], capture_output=True, text=True, timeout=120
        )

    def query(self, replica: Replica, *argv: str) -> dict | None:
        done = self.run(
            *argv,
            f"--{replica.service}-address",
            replica.address,
            "--tls-ca",
            self.args.ca,
            "--json",
        )
        return json.loads(done.stdout) if done.returncode == 0 else None

    def stats(self, replica: Replica, media: int) -> dict[str, int]:
        """The totals of one media item from one replica; empty unless the answer is complete."""
        reply = self.query(replica, "stats", str(media)) or {}
        if not complete(reply):
            return {}
        s = reply.get("stats", {})
        return {
            k: int(s.get(k, 0))
            for k in ("starts", "stops", "ends", "viewTimeSeconds", "uniqueViewers")
        }

    def offsets(self, replica: Replica, media: int) -> dict[int, int]:
        """{partition: offset} of a complete stats answer's position."""
        reply = self.query(replica, "stats", str(media)) or {}
        return {
            int(p.get("partition", 0)): int(p.get("offset", 0))
            for p in reply.get("position", {}).get("partitions", [])
        }

    def similar(self, replica: Replica, media: int) -> list[tuple[int, int, float]]:
        reply = self.query(replica, "similar", str(media), "--limit", "20") or {}
        if not complete(reply):
            return []
        return [
            (int(m["mediaId"]), int(m.get("coViewers", 0)), float(m.get("score", 0.0)))
            for m in reply.get("similarMedia", [])
        ]


def complete(reply: dict) -> bool:
    """The answer covers every partition of the topic (PARTITIONS in the compose file)."""
    partitions = reply.get("position", {}).get("partitions", [])
    return sorted(int(p.get("partition", 0)) for p in partitions) == list(range(PARTITIONS))


def same_similar(got: list[tuple[int, int, float]], want: list[tuple[int, int, float]]) -> bool:
    return [g[:2] for g in got] == [x[:2] for x in want] and all(
        abs(g[2] - x[2]) < 1e-9 for g, x in zip(got, want)
    )


def until(produce, good, timeout: float):  # type: ignore[no-untyped-def]
    """Poll `produce()` until `good(value)` or the timeout; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = produce()
        if good(value) or time.monotonic() > deadline:
            return value
        time.sleep(1)


def row(ok: bool, step: str, detail: str) -> bool:
    print(f"{'ok' if ok else 'FAILED'}\t{step}\t{detail}", flush=True)
    return ok


def fmt_similar(items: list[tuple[int, int, float]]) -> str:
    return ", ".join(f"{m} ({c} co-viewers, {s:.4f})" for m, c, s in items) or "none"


def verify(args: argparse.Namespace) -> int:
    client = Client(args)
    events, stats, w = expectations(Path(args.file))
    media = max(stats, key=lambda m: (stats[m]["uniqueViewers"], -m))
    ok = True

    # The token is required: the same upload without it must be refused.
    denied = client.run(
        "upload",
        args.file,
        "--address",
        args.ingest,
        "--tls-ca",
        args.ca,
        "--token",
        "",
        "--no-progress",
    )
    refusal = re.search(r"UNAUTHENTICATED[^:]*: [^:]*", denied.stderr)
    ok &= row(
        denied.returncode != 0 and refusal is not None,
        "upload without the token is refused",
        refusal.group(0) if refusal else (denied.stdout + denied.stderr).strip()[-70:],
    )

    up = client.run(
        "upload",
        args.file,
        "--address",
        args.ingest,
        "--tls-ca",
        args.ca,
        "--token",
        args.token,
        "--no-progress",
    )
    summary = (up.stdout.strip().splitlines() or [up.stderr.strip()])[-1]
    accepted = f"sent {events} events" in summary and f"{events} accepted, 0 rejected" in summary
    ok &= row(
        up.returncode == 0 and accepted,
        "upload over TLS with the bearer token",
        f"{events} events in the file: "
        + (f"{events} accepted, 0 rejected" if accepted else summary[:70]),
    )
    if not ok:
        print(up.stdout + up.stderr, file=sys.stderr)
        return 1

    replicas = read_replicas(args.replicas)
    first_stats, first_rec = replicas["stats"][0], replicas["recommender"][0]
    want = stats[media]
    got = until(lambda: client.stats(first_stats, media), lambda s: s == want, args.timeout)
    ok &= row(
        got == want,
        f"stats GetMediaStats({media}) applied",
        f"via {first_stats.container}: starts {got.get('starts')}/{want['starts']}, viewers "
        f"{got.get('uniqueViewers')}/{want['uniqueViewers']}, view time "
        f"{got.get('viewTimeSeconds')}/{want['viewTimeSeconds']} s (got/from file)",
    )
    for replica in replicas["stats"]:
        answers = {m: client.stats(replica, m) for m in stats}
        wrong = sorted(m for m in answers if answers[m] != stats[m])
        ok &= row(
            not wrong,
            f"stats via {replica.container}",
            f"all {len(stats)} media complete and equal to the file's counts"
            if not wrong
            else f"differ or incomplete: {wrong}",
        )

    want_similar = similar_expected(w, media)
    got_similar = until(
        lambda: client.similar(first_rec, media),
        lambda s: same_similar(s, want_similar),
        args.timeout,
    )
    ok &= row(
        bool(want_similar) and same_similar(got_similar, want_similar),
        f"recommender GetSimilarMedia({media}) applied",
        f"via {first_rec.container}: {len(got_similar)} items; top "
        f"{fmt_similar(got_similar[:1])}"
        + (
            ""
            if same_similar(got_similar, want_similar)
            else f"; expected {fmt_similar(want_similar)}"
        ),
    )
    for replica in replicas["recommender"]:
        wrong = [
            m for m in stats if not same_similar(client.similar(replica, m), similar_expected(w, m))
        ]
        ok &= row(
            not wrong,
            f"similar via {replica.container}",
            f"GetSimilarMedia of all {len(stats)} media complete and equal to the file's cosines"
            if not wrong
            else f"differ or incomplete: {wrong}",
        )

    # What each store slot holds now: its partitions, each at the topic's end offset (every
    # answer above was complete, so every partition's owner has applied the whole upload).
    ends = client.offsets(first_stats, media)
    stores: dict[str, dict[str, dict[int, int]]] = {}
    for service, members in replicas.items():
        split, owned = check_split(service, members)
        ok &= split
        stores[service] = {slot: {p: ends[p] for p in ps} for slot, ps in owned.items()}

    Path(args.answers).write_text(
        json.dumps(
            {
                "stats": {m: client.stats(first_stats, m) for m in stats},
                "similar": {m: client.similar(first_rec, m) for m in stats},
                "stores": stores,
                "ends": ends,
            }
        )
    )
    return 0 if ok else 1


def metrics(replica: Replica) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample on a replica's /metrics."""
    url = f"http://127.0.0.1:{replica.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    samples = []
    for line in text.splitlines():
        found = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if found and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(2) or ""))
            samples.append((found.group(1), labels, float(found.group(3))))
    return samples


def check_split(service: str, members: list[Replica]) -> tuple[bool, dict[str, list[int]]]:
    """The partitions are split over the replicas (each owns some, all agree who owns which),
    each on a store slot of its own, and each got answers from every other (TLS peer calls).
    Also returns the partitions each store slot owns."""
    maps = {}
    asked: dict[str, set[str]] = {}
    for replica in members:
        samples = metrics(replica)
        maps[replica.container] = {
            int(labels["partition"]): labels["address"]
            for name, labels, value in samples
            if name == "viewevents_partition_owner" and value == 1
        }
        asked[replica.container] = {
            labels["owner"]
            for name, labels, value in samples
            if name == "viewevents_fanout_calls_total" and labels.get("outcome") == "ok" and value
        }
    owners = next(iter(maps.values()))
    agreed = all(m == owners for m in maps.values())
    by_replica = {
        r.container: sorted(p for p, a in owners.items() if a == r.advertised) for r in members
    }
    split = (
        agreed
        and sorted(owners) == list(range(PARTITIONS))
        and all(by_replica.values())
        and sum(len(ps) for ps in by_replica.values()) == PARTITIONS
    )
    peers_ok = all(
        {o.advertised for o in members if o is not r} <= asked[r.container] for r in members
    )
    slots = sorted(r.slot for r in members)
    own_stores = len(set(slots)) == len(slots) and "-" not in slots
    ok = row(
        split and peers_ok and own_stores,
        f"{service}: partitions split, peers over TLS",
        ", ".join(f"{c} {r.slot} owns {by_replica[c]}" for c, r in zip(by_replica, members))
        + ("" if peers_ok else "; a replica got no answer from a peer")
        + ("" if agreed else f"; owner maps DIFFER: {maps}"),
    )
    return ok, {r.slot: by_replica[r.container] for r in members}


def consumed(replica: Replica) -> int:
    """viewevents_events_consumed_total of a replica (records it read from Kafka since start)."""
    return int(
        sum(v for name, _, v in metrics(replica) if name == "viewevents_events_consumed_total")
    )


RESUMING = re.compile(
    r"assigned partitions (\[[\d, ]*\]); resuming from stored offsets (\{[\d:, ]*\})"
)


def resumed_from(log: Path) -> dict[int, int]:
    """Per partition, the offset its store held the first time the replica was assigned it,
    0 when it held none (the consumer logs its stored offsets at every assignment)."""
    first: dict[int, int] = {}
    for found in RESUMING.finditer(log.read_text(errors="replace")):
        stored = ast.literal_eval(found.group(2))
        for partition in ast.literal_eval(found.group(1)):
            first.setdefault(int(partition), int(stored.get(partition, 0)))
    return first


def again(args: argparse.Namespace) -> int:
    """After `down` (volumes kept) and `up`: the same answers from every replica, and each
    replica's store slot still held, when its partitions were first assigned again, exactly
    what it held before (so answers come from the kept RocksDB volumes, not from a replay).
    A replica that joined the group before the others may meanwhile replay partitions another
    store holds; it may re-read at most those records."""
    client = Client(args)
    before = json.loads(Path(args.answers).read_text())
    ends = {int(p): o for p, o in before["ends"].items()}
    replicas = read_replicas(args.replicas)
    same = True
    for replica in replicas["stats"]:
        stats = {m: client.stats(replica, int(m)) for m in before["stats"]}
        same &= stats == before["stats"] and all(s.get("starts") for s in stats.values())
    for replica in replicas["recommender"]:
        same &= all(
            same_similar(client.similar(replica, int(m)), [tuple(x) for x in want])
            for m, want in before["similar"].items()
        )
    kept, notes = True, []
    for service, members in replicas.items():
        for replica in members:
            held = {int(p): o for p, o in before["stores"][service].get(replica.slot, {}).items()}
            resumed = resumed_from(Path(args.logs) / f"{replica.container}.log")
            lost = {p: resumed.get(p) for p in held if p in resumed and resumed[p] != held[p]}
            reread = consumed(replica)
            others = sum(o for p, o in ends.items() if p not in held)
            kept &= not lost and reread <= others
            notes.append(
                f"{replica.container} {replica.slot} resumed {dict(sorted(resumed.items()))}"
                + (f" LOST {lost}" if lost else "")
                + f", re-read {reread}"
                + (f" > {others}" if reread > others else "")
            )
    count = sum(len(rs) for rs in replicas.values())
    return (
        0
        if row(
            same and kept,
            "state kept across down + up",
            ("same answers from all " if same else "answers DIFFER or incomplete on some of the ")
            + f"{count} replicas for {len(before['stats'])} media; "
            + "; ".join(notes),
        )
        else 1
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("gen").add_argument("file")
    for name in ("verify", "again"):
        p = commands.add_parser(name)
        if name == "verify":
            p.add_argument("file")
        p.add_argument("answers")
        p.add_argument("--viewevents", required=True)
        p.add_argument("--ingest", required=True)
        p.add_argument("--replicas", required=True, help="the stats and recommender replicas")
        p.add_argument("--ca", required=True)
        p.add_argument("--token", default="")
        if name == "again":
            p.add_argument("--logs", required=True, help="DIR/<container>.log of each replica")
        p.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()
    if args.command == "gen":
        gen(Path(args.file))
        return 0
    return verify(args) if args.command == "verify" else again(args)


if __name__ == "__main__":
    sys.exit(main())
