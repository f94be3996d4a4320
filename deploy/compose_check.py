"""Client side of deploy/compose-check.sh: data, expectations and queries (stdlib only).

    python deploy/compose_check.py gen FILE                 a small event file (legacy format)
    python deploy/compose_check.py verify FILE ANSWERS ...  upload it, check stats + recommender
    python deploy/compose_check.py again ANSWERS ...        the same answers after a restart

Every service call goes through the project's own client, `viewevents` (upload with --tls-ca and
--token; stats/similar with --tls-ca --json). The expected numbers are computed here from the
file as written, not by project code. Each check prints one line `RESULT<TAB>step<TAB>detail` for
the summary table; the exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

HEARTBEAT_SECONDS = 30  # VIEWEVENTS_HEARTBEAT_SECONDS default: view time per waypoint
MIN_CO_VIEWERS = 2  # VIEWEVENTS_RECOMMENDER_MIN_CO_VIEWERS default
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


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.args.viewevents, *argv], capture_output=True, text=True, timeout=120
        )

    def query(self, *argv: str) -> dict | None:
        done = self.run(
            *argv,
            "--stats-address",
            self.args.stats,
            "--recommender-address",
            self.args.recommender,
            "--tls-ca",
            self.args.ca,
            "--json",
        )
        return json.loads(done.stdout) if done.returncode == 0 else None

    def stats(self, media: int) -> dict[str, int]:
        reply = self.query("stats", str(media)) or {}
        s = reply.get("stats", {})
        return {
            k: int(s.get(k, 0))
            for k in ("starts", "stops", "ends", "viewTimeSeconds", "uniqueViewers")
        }

    def similar(self, media: int) -> list[tuple[int, int, float]]:
        reply = self.query("similar", str(media), "--limit", "20") or {}
        return [
            (int(m["mediaId"]), int(m.get("coViewers", 0)), float(m.get("score", 0.0)))
            for m in reply.get("similarMedia", [])
        ]


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

    want = stats[media]
    got = until(lambda: client.stats(media), lambda s: s == want, args.timeout)
    ok &= row(
        got == want,
        f"stats GetMediaStats({media})",
        f"starts {got['starts']}/{want['starts']}, viewers {got['uniqueViewers']}/"
        f"{want['uniqueViewers']}, view time {got['viewTimeSeconds']}/"
        f"{want['viewTimeSeconds']} s (got/from file)",
    )
    others = {m: client.stats(m) for m in stats if m != media}
    wrong = [m for m in others if others[m] != stats[m]]
    ok &= row(
        not wrong,
        f"stats of the other {len(others)} media",
        "all equal to the file's counts" if not wrong else f"differ: {wrong}",
    )

    want_similar = similar_expected(w, media)
    got_similar = until(
        lambda: client.similar(media), lambda s: same_similar(s, want_similar), args.timeout
    )
    ok &= row(
        bool(want_similar) and same_similar(got_similar, want_similar),
        f"recommender GetSimilarMedia({media})",
        f"{len(got_similar)} items; top {fmt_similar(got_similar[:1])}"
        + (
            ""
            if same_similar(got_similar, want_similar)
            else f"; expected {fmt_similar(want_similar)}"
        ),
    )
    Path(args.answers).write_text(
        json.dumps(
            {
                "stats": {m: client.stats(m) for m in stats},
                "similar": {m: client.similar(m) for m in stats},
            }
        )
    )
    return 0 if ok else 1


def consumed(address: str) -> int:
    """viewevents_events_consumed_total of a service (records it read from Kafka since start)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("viewevents_events_consumed_total{")
    )


def again(args: argparse.Namespace) -> int:
    """After `down` (volumes kept) and `up`: the same answers, from the kept RocksDB state, with
    nothing re-read from Kafka (a lost state volume would be rebuilt by a replay, same answers)."""
    client = Client(args)
    before = json.loads(Path(args.answers).read_text())
    stats = {m: client.stats(int(m)) for m in before["stats"]}
    similar = {m: [list(x) for x in client.similar(int(m))] for m in before["similar"]}
    same = stats == before["stats"] and all(
        same_similar([tuple(x) for x in similar[m]], [tuple(x) for x in before["similar"][m]])
        for m in similar
    )
    nonempty = all(s["starts"] for s in stats.values())
    replayed = {
        "stats": consumed(args.stats_metrics),
        "recommender": consumed(args.recommender_metrics),
    }
    return (
        0
        if row(
            same and nonempty and not any(replayed.values()),
            "state kept across down + up",
            ("same answers for all " if same else "answers DIFFER for some of the ")
            + f"{len(stats)} media; records re-read from Kafka: "
            + ", ".join(f"{k} {v}" for k, v in replayed.items()),
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
        p.add_argument("--stats", required=True)
        p.add_argument("--recommender", required=True)
        p.add_argument("--ca", required=True)
        p.add_argument("--token", default="")
        if name == "again":
            p.add_argument("--stats-metrics", required=True, help="HOST:PORT")
            p.add_argument("--recommender-metrics", required=True, help="HOST:PORT")
        p.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()
    if args.command == "gen":
        gen(Path(args.file))
        return 0
    return verify(args) if args.command == "verify" else again(args)


if __name__ == "__main__":
    sys.exit(main())
