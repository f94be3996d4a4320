"""Unit tests for viewevents_tools.generator: exact sizes, reproducibility, planted structure, noise, memory.

The file is read back with json / viewevents_client.event_files and classified here, independently of the
generator's own bookkeeping, so a generator that miscounts or mislabels its noise fails.
"""

from __future__ import annotations

import collections
import gzip
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from viewevents.v1 import view_event_pb2 as pb
from viewevents_client.event_files import parse_line
from viewevents_tools import generator
from viewevents_tools.generator import GenStats, generate, media_group, media_length, user_groups

ALL_KEYS = {"EventId", "MediaId", "UserId", "Timestamp", "DateTime", "EventType"}
START = datetime(2024, 1, 1, tzinfo=UTC)
START_TS = 1_704_067_200  # 2024-01-01T00:00:00Z


def read_lines(path: Path) -> list[bytes]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return f.read().splitlines()


@pytest.fixture(scope="module")
def clean_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GenStats]:
    path = tmp_path_factory.mktemp("gen") / "clean.jsonl"
    return path, generate(str(path), 40_000, seed=5, users=4_000, noise=0.0)


@pytest.fixture(scope="module")
def noisy_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GenStats]:
    path = tmp_path_factory.mktemp("gen") / "noisy.jsonl"
    return path, generate(str(path), 60_000, seed=9, noise=0.1)


@pytest.mark.parametrize("n", [0, 1, 7, 1000, 12_345])
def test_writes_exactly_n_lines(tmp_path: Path, n: int) -> None:
    path = tmp_path / "out.jsonl"
    stats = generate(str(path), n, noise=0.05)
    raw = path.read_bytes()
    assert raw.count(b"\n") == n
    assert raw == b"" or raw.endswith(b"\n")
    assert stats.lines == n
    assert stats.events + stats.noise_lines == n
    assert all(line.strip() for line in raw.splitlines()), "no blank lines"


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a, b, c = (tmp_path / f"{name}.jsonl" for name in "abc")
    sa = generate(str(a), 20_000, seed=3, noise=0.05)
    sb = generate(str(b), 20_000, seed=3, noise=0.05)
    sc = generate(str(c), 20_000, seed=4, noise=0.05)
    assert a.read_bytes() == b.read_bytes()
    assert sa == sb
    assert a.read_bytes() != c.read_bytes()
    assert sa != sc


def test_gzip_output_is_reproducible_and_equal_to_plain(tmp_path: Path) -> None:
    plain, gz1, gz2 = tmp_path / "p.jsonl", tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    generate(str(plain), 5_000, seed=2)
    generate(str(gz1), 5_000, seed=2)
    generate(str(gz2), 5_000, seed=2)
    assert gz1.read_bytes()[:2] == b"\x1f\x8b"
    assert gz1.read_bytes() == gz2.read_bytes(), "no timestamp or name in the gzip header"
    assert gzip.decompress(gz1.read_bytes()) == plain.read_bytes()
    assert len(gz1.read_bytes()) < len(plain.read_bytes()) / 3


def test_clean_file_is_all_valid_events(clean_file: tuple[Path, GenStats]) -> None:
    path, stats = clean_file
    assert stats.events == stats.lines == 40_000
    assert stats.noise_lines == 0
    ids = set()
    for line in read_lines(path):
        d = json.loads(line)
        assert set(d) == ALL_KEYS
        assert line.decode() == json.dumps(d), "one canonical layout for every line"
        p = parse_line(line)
        assert p.event is not None, line
        e = p.event
        assert 1 <= e.media_id <= 2_000 and 1 <= e.user_id <= 4_000
        assert e.event_type != pb.EVENT_TYPE_UNSPECIFIED
        assert d["Timestamp"] == e.event_time.seconds, "Timestamp and DateTime agree exactly"
        ids.add(e.event_id)
    assert len(ids) == 40_000, "event ids are unique"


def _by_user(path: Path) -> dict[int, list[pb.ViewEvent]]:
    users: dict[int, list[pb.ViewEvent]] = collections.defaultdict(list)
    for line in read_lines(path):
        e = parse_line(line).event
        assert e is not None
        users[e.user_id].append(e)
    return users


def test_sessions_are_well_formed(clean_file: tuple[Path, GenStats]) -> None:
    """Per user, in event-time order: start, waypoints 30 s apart, then stop or end within 30 s."""
    path, stats = clean_file
    sessions = ends = stops = 0
    waypoint_counts = []
    for user, events in _by_user(path).items():
        events.sort(key=lambda e: e.event_time.seconds)
        i = 0
        while i < len(events):
            first = events[i]
            assert first.event_type == pb.EVENT_TYPE_STREAM_START, (user, first)
            sessions += 1
            t, media, waypoints = first.event_time.seconds, first.media_id, 0
            i += 1
            while i < len(events) and events[i].event_type == pb.EVENT_TYPE_WAYPOINT:
                assert events[i].media_id == media
                assert events[i].event_time.seconds - t == 30, (user, events[i])
                t = events[i].event_time.seconds
                waypoints += 1
                i += 1
            if i == len(events):
                break  # the file ended during this session
            last = events[i]
            assert last.event_type in (pb.EVENT_TYPE_STREAM_STOP, pb.EVENT_TYPE_STREAM_END)
            assert last.media_id == media
            assert waypoints >= 1
            gap = last.event_time.seconds - t
            length = media_length(media, seed=5)
            if last.event_type == pb.EVENT_TYPE_STREAM_END:
                ends += 1
                assert 1 <= gap <= 30 and waypoints == length
            else:
                stops += 1
                assert 1 <= gap <= 29 and waypoints < length
            waypoint_counts.append(waypoints)
            i += 1
    assert sessions == stats.sessions
    assert ends > 0 and stops > 0
    assert min(waypoint_counts) == 1 and max(waypoint_counts) >= 60, "heavy-tailed lengths"
    assert max(waypoint_counts) <= generator.MAX_WAYPOINTS


def test_time_span_and_rough_order(clean_file: tuple[Path, GenStats]) -> None:
    path, _ = clean_file
    times = [json.loads(line)["Timestamp"] for line in read_lines(path)]
    assert min(times) >= START_TS
    span_days = (max(times) - START_TS) / 86_400
    assert 6.0 <= span_days <= 7.5, span_days
    running = inversions = 0
    for t in times:
        assert t >= running - 5, "only small upload jitter reorders clean lines"
        inversions += t < running
        running = max(running, t)
    assert inversions > 0, "sessions interleave: the file is not strictly sorted"


def test_end_is_likelier_for_short_media(clean_file: tuple[Path, GenStats]) -> None:
    path, _ = clean_file
    outcome: dict[bool, collections.Counter[int]] = {
        True: collections.Counter(),
        False: collections.Counter(),
    }
    for line in read_lines(path):
        e = parse_line(line).event
        assert e is not None
        if e.event_type in (pb.EVENT_TYPE_STREAM_STOP, pb.EVENT_TYPE_STREAM_END):
            short = media_length(e.media_id, seed=5) <= 6
            outcome[short][e.event_type] += 1

    def end_share(c: collections.Counter[int]) -> float:
        return c[pb.EVENT_TYPE_STREAM_END] / (
            c[pb.EVENT_TYPE_STREAM_END] + c[pb.EVENT_TYPE_STREAM_STOP]
        )

    assert end_share(outcome[True]) > 0.3
    assert end_share(outcome[True]) > 3 * end_share(outcome[False])


def test_planted_groups_and_popularity(clean_file: tuple[Path, GenStats]) -> None:
    path, _ = clean_file
    starts = [
        (e.user_id, e.media_id)
        for line in read_lines(path)
        if (e := parse_line(line).event) is not None and e.event_type == pb.EVENT_TYPE_STREAM_START
    ]
    in_group = sum(media_group(m, seed=5) in user_groups(u, seed=5) for u, m in starts)
    assert 0.80 <= in_group / len(starts) <= 0.92
    # A wrong seed gives an unrelated grouping: about 1/20 (plus second groups) matches.
    wrong = sum(media_group(m, seed=6) in user_groups(u, seed=5) for u, m in starts)
    assert wrong / len(starts) < 0.2
    popular = collections.Counter(m for _, m in starts)
    top = sum(count for _, count in popular.most_common(200))  # top 10% of 2000 items
    assert top / len(starts) > 0.5, "power-law popularity"


def test_group_functions() -> None:
    sizes = collections.Counter(
        media_group(m, seed=1, media=2_000, groups=20) for m in range(1, 2001)
    )
    assert sorted(sizes) == list(range(20))
    assert set(sizes.values()) == {100}
    assert [media_group(m, seed=1) for m in range(1, 50)] != [
        media_group(m, seed=2) for m in range(1, 50)
    ]
    assert [media_group(m) for m in range(1, 50)] == [media_group(m, seed=1) for m in range(1, 50)]
    homes = collections.Counter(user_groups(u, seed=1, groups=20)[0] for u in range(1, 20_001))
    assert len(homes) == 20 and min(homes.values()) > 700
    seconds = sum(len(user_groups(u, seed=1)) == 2 for u in range(1, 20_001))
    assert 0.1 < seconds / 20_000 < 0.2
    assert all(len(set(user_groups(u))) == len(user_groups(u)) for u in range(1, 2_000))
    with pytest.raises(ValueError):
        media_group(0)
    with pytest.raises(ValueError):
        media_group(2_001, media=2_000)


def classify(lines: list[bytes]) -> collections.Counter[str]:
    """Label each line by what a reader sees, without any help from the generator."""
    kinds: collections.Counter[str] = collections.Counter()
    seen: set[str] = set()
    running = 0
    for line in lines:
        try:
            raw: Any = json.loads(line)
        except ValueError:
            kinds["not_json"] += 1
            continue
        if set(raw) != ALL_KEYS:
            kinds["missing_field"] += 1
            continue
        p = parse_line(line)
        reasons = {v.reason for v in p.violations}
        if p.event is None:
            assert len(reasons) == 1, p.violations
            kinds[
                {
                    "WRONG_TYPE": "wrong_type",
                    "UNKNOWN_EVENT_TYPE": "unknown_event_type",
                    "TIME_MISMATCH": "time_mismatch",
                }[reasons.pop()]
            ] += 1
            continue
        e = p.event
        if e.user_id <= 0 or e.media_id <= 0:
            kinds["non_positive"] += 1
            continue
        if e.event_id in seen:
            kinds["duplicate"] += 1
            continue
        seen.add(e.event_id)
        t = e.event_time.seconds
        if t < running - 3600:
            kinds["late"] += 1
            continue
        assert t >= running - 5, line
        running = max(running, t)
        kinds["clean"] += 1
    return kinds


def test_noise_kinds_are_what_they_claim(noisy_file: tuple[Path, GenStats]) -> None:
    path, stats = noisy_file
    kinds = classify(read_lines(path))
    assert kinds.pop("clean") == stats.events
    assert dict(kinds) == {k: v for k, v in stats.noise.items() if v}
    assert set(kinds) == set(generator.NOISE_KINDS), "every kind occurs at 10% noise"


def test_noise_share_roughly_as_configured(noisy_file: tuple[Path, GenStats]) -> None:
    _, stats = noisy_file
    share = stats.noise_lines / stats.lines
    # Slightly under 10%: late events still held back when the file ends are never written.
    assert 0.085 <= share <= 0.105, share
    for kind in ("missing_field", "wrong_type", "unknown_event_type", "duplicate"):
        assert stats.noise[kind] > 0.01 * stats.lines, kind
    assert 0 < stats.noise["not_json"] < stats.noise["wrong_type"], "only a few garbage lines"


def test_default_noise_share(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    stats = generate(str(path), 50_000)
    assert 0.015 <= stats.noise_lines / stats.lines <= 0.025
    assert sum(classify(read_lines(path)).values()) == 50_000


def test_late_events_are_hours_behind(noisy_file: tuple[Path, GenStats]) -> None:
    path, stats = noisy_file
    running, lags = 0, []
    seen: set[str] = set()
    for line in read_lines(path):
        e = parse_line(line).event
        if e is None or not e.HasField("event_time") or e.event_id in seen:
            continue
        seen.add(e.event_id)
        t = e.event_time.seconds
        if t < running - 3600:
            lags.append(running - t)
        running = max(running, t)
    assert len(lags) == stats.noise["late"]
    assert min(lags) > 3 * 3600 and max(lags) > 86_400, "hours to days"


# VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec and so reports the forking pytest's
# own peak, while VmHWM belongs to the new address space.
_PEAK_RSS_CHILD = """
import sys
from viewevents_tools.generator import generate
generate(sys.argv[1], int(sys.argv[2]))
with open("/proc/self/status") as f:
    print(next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")))
"""


def test_memory_stays_bounded(tmp_path: Path) -> None:
    """Peak RSS does not grow with the number of events (a fresh process per size).

    Measured in child processes: tracemalloc would slow the generator ~30x, and this process's
    own peak already includes whatever earlier tests allocated.
    """
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc for the peak resident set size")

    def peak(n: int) -> tuple[int, int]:
        path = tmp_path / f"m{n}.jsonl"
        done = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS_CHILD, str(path), str(n)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return int(done.stdout.split()[-1]), path.stat().st_size

    small, _ = peak(20_000)
    big, size = peak(500_000)  # ~70 MB of output
    assert big < size / 3, (big, size)
    assert big - small < 8 * 2**20, f"peak RSS grew {(big - small) / 2**20:.1f} MiB"


def test_validation() -> None:
    for kwargs in ({"noise": 1.5}, {"users": 0}, {"groups": 3000}, {"days": 0}):
        with pytest.raises(ValueError):
            generate("/nonexistent/never-written.jsonl", 10, **kwargs)
    with pytest.raises(ValueError):
        generate("/nonexistent/never-written.jsonl", -1)


def test_cli_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.jsonl.gz"
    rc = generator.main(
        [
            str(out),
            "--events",
            "3000",
            "--seed",
            "4",
            "--users",
            "100",
            "--media",
            "50",
            "--groups",
            "5",
            "--noise",
            "0",
            "--start",
            "2024-06-01T00:00:00",
            "--days",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    lines = read_lines(out)
    assert len(lines) == 3000
    events = [parse_line(line).event for line in lines]
    assert all(e is not None and 1 <= e.user_id <= 100 and 1 <= e.media_id <= 50 for e in events)
    first = min(e.event_time.seconds for e in events if e)
    assert datetime.fromtimestamp(first, UTC) >= datetime(2024, 6, 1, tzinfo=UTC)
    assert "3000 lines" in capsys.readouterr().err
    assert generator.main(["-", "--events", "1", "--noise", "2"]) == 2


def test_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stats = generate(str(tmp_path / "p.jsonl"), 20_000, progress=True)
    assert stats.lines == 20_000
    assert "ev/s" in capsys.readouterr().err
