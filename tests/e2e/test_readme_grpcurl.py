"""Every grpcurl command of the README, run with the real grpcurl against a real stack."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict

import pytest

from tests.support.broker import end_offsets
from tests.support.configs import REPO, free_port, test_config
from tests.support.grpcurl import GRPCURL
from tests.support.positions import recommender_position, stats_position, wait_applied
from tests.support.processes import ServiceProcess

DEFAULTS = {
    "ingest": "127.0.0.1:50051",
    "stats": "127.0.0.1:50052",
    "recommender": "127.0.0.1:50053",
}


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- grpcurl:begin -->")[1].split("<!-- grpcurl:end -->")[0]
    lines = [line for line in block.splitlines() if line.startswith("grpcurl ")]
    assert len(lines) >= 12
    return lines


@pytest.fixture(scope="module")
def stack(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    folder = tmp_path_factory.mktemp("readme")
    config = test_config(
        kafka_bootstrap,
        ingest_address=f"127.0.0.1:{free_port()}",
        stats_address=f"127.0.0.1:{free_port()}",
        recommender_address=f"127.0.0.1:{free_port()}",
        stats_state_dir=str(folder / "stats"),
        recommender_state_dir=str(folder / "rec"),
        stats_group=f"readme-stats-{time.time_ns()}",
        recommender_group=f"readme-rec-{time.time_ns()}",
        stats_metrics_port=free_port(),
    )
    services = [
        ServiceProcess(
            module, config, getattr(config, f"{name}_address"), folder / f"{name}.log"
        ).start()
        for name, module in (
            ("ingest", "ingest_service"),
            ("stats", "stats_service"),
            ("recommender", "recommender_service"),
        )
    ]
    for service in services:
        service.wait_serving()
    yield {
        "ingest": config.ingest_address,
        "stats": config.stats_address,
        "recommender": config.recommender_address,
        "stats_metrics": str(config.stats_metrics_port),
        "bootstrap": kafka_bootstrap,
        "view_topic": config.view_topic,
    }
    for service in services:
        service.stop()


class Expected(TypedDict):
    viewers: dict[int, set[int]]  # per media id
    waypoints: dict[int, int]
    waypoint_minutes: dict[int, set[str]]
    top3: list[int]  # media ids, most unique viewers first
    uploaded: int


def expected_from_examples() -> Expected:
    """Brute force over docs/examples/upload-requests.jsonl plus the README's Publish event."""
    events = [
        e
        for line in (REPO / "docs/examples/upload-requests.jsonl").read_text().splitlines()
        for e in json.loads(line)["events"]
    ]
    events.append(
        {
            "eventId": "readme-publish-1",
            "mediaId": "10",
            "userId": "47",
            "eventType": "EVENT_TYPE_STREAM_START",
            "eventTime": "2026-11-28T13:00:00Z",
        }
    )
    unique = {e["eventId"]: e for e in events}.values()
    viewers: dict[int, set[int]] = defaultdict(set)
    waypoints: dict[int, int] = defaultdict(int)
    waypoint_minutes: dict[int, set[str]] = defaultdict(set)
    for e in unique:
        viewers[int(e["mediaId"])].add(int(e["userId"]))
        if e["eventType"] == "EVENT_TYPE_WAYPOINT":
            waypoints[int(e["mediaId"])] += 1
            waypoint_minutes[int(e["mediaId"])].add(e["eventTime"][:16])
    ranking = sorted(viewers, key=lambda m: (-len(viewers[m]), m))
    return {
        "viewers": viewers,
        "waypoints": waypoints,
        "waypoint_minutes": waypoint_minutes,
        "top3": ranking[:3],
        "uploaded": len(events) - 1,
    }


def test_every_readme_command(stack: dict[str, str]) -> None:
    expected = expected_from_examples()
    outputs: dict[str, list[str]] = defaultdict(list)
    upload_positions: list[dict] = []
    for command in readme_commands():
        for name, default in DEFAULTS.items():
            command = command.replace(default, stack[name])
        command = command.replace("grpcurl ", f"{GRPCURL} ", 1)
        if "GetMediaStats" in command and upload_positions:
            # Both consumers apply everything sent so far (the upload and what followed it) in
            # parallel; the recommender's answers are checked below.
            wanted = end_offsets(stack["bootstrap"], stack["view_topic"])
            assert sum(wanted.values()) >= sum(int(p["offset"]) for p in upload_positions)
            wait_applied(stack["stats"], stats_position, wanted, timeout=60)
            wait_applied(stack["recommender"], recommender_position, wanted, timeout=60)
        result = subprocess.run(
            ["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        found = re.search(r"(\w+Service/\w+|Health/\w+)|\b(list)$|(describe \S+)$", command)
        assert found, command
        key = next(x for x in found.groups() if x)
        outputs[key].append(result.stdout)
        if key.endswith("/Upload"):
            upload_positions = json.loads(result.stdout)["positions"]

    assert "viewevents.v1.IngestService" in outputs["list"][0]
    assert "rpc GetMediaStats" in outputs["describe viewevents.v1.StatsService"][0]
    assert "rpc GetSimilarMedia" in outputs["describe viewevents.v1.RecommenderService"][0]
    assert json.loads(outputs["Health/Check"][0]) == {"status": "SERVING"}
    upload = json.loads(outputs["IngestService/Upload"][0])
    assert int(upload["accepted"]) == expected["uploaded"] and "rejected" not in upload
    assert json.loads(outputs["IngestService/Publish"][0])["accepted"] == "1"
    acks = [
        json.loads(chunk)
        for chunk in re.split(r"(?<=\})\n(?=\{)", outputs["IngestService/UploadStream"][0].strip())
    ]
    assert [int(a.get("request_index", 0)) for a in acks] == list(range(6))

    stats = json.loads(outputs["StatsService/GetMediaStats"][0])["stats"]
    assert int(stats["unique_viewers"]) == len(
        expected["viewers"][7]
    )  # re-sent events counted once
    assert int(stats["view_time_seconds"]) == 30 * expected["waypoints"][7]
    trend = json.loads(outputs["StatsService/GetMediaTrend"][0])
    assert (
        sum(int(b.get("view_time_seconds", 0)) for b in trend["buckets"])
        == 30 * expected["waypoints"][7]
    )
    top = json.loads(outputs["StatsService/ListTopMedia"][0])
    assert [int(m["media_id"]) for m in top["media"]] == expected["top3"]

    similar = [json.loads(out) for out in outputs["RecommenderService/GetSimilarMedia"]]
    for answer in similar:
        assert int(answer["similar_media"][0]["media_id"]) == 8  # watched by the same three users
    recommended = json.loads(outputs["RecommenderService/RecommendForUser"][0])  # user 42: 7 and 8
    assert not recommended.get("fallback")
    picks = [int(r["media_id"]) for r in recommended["recommendations"]]
    assert picks[0] == 10 and not {7, 8} & set(picks)  # 10 is watched with 8 by two users


def viewevents_cli(stack: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run(
        [
            sys.executable,
            "-m",
            "viewevents_tools.cli",
            *args,
            "--stats-address",
            stack["stats"],
            "--recommender-address",
            stack["recommender"],
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_queries_after_the_readme_upload(stack: dict[str, str], tmp_path: Path) -> None:
    """Runs after test_every_readme_command (same stack, data applied)."""
    expected = expected_from_examples()
    as_json = viewevents_cli(stack, "stats", "7", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert int(json.loads(as_json.stdout)["stats"]["uniqueViewers"]) == len(expected["viewers"][7])
    as_table = viewevents_cli(stack, "stats", "7")
    assert as_table.stdout.splitlines()[0].split()[:3] == ["media", "view", "time"]
    assert as_table.stdout.splitlines()[2].split()[:2] == [
        "7",
        f"{30 * expected['waypoints'][7]:,}",
    ]

    png = tmp_path / "trend.png"
    trend = viewevents_cli(
        stack,
        "trend",
        "7",
        "--start",
        "2026-11-28T12:00:00Z",
        "--end",
        "2026-11-28T13:00:00Z",
        "--granularity",
        "minute",
        "--plot",
        str(png),
    )
    assert trend.returncode == 0, trend.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bars = [line for line in trend.stdout.splitlines() if "\u2588" in line]
    assert len(bars) == len(expected["waypoint_minutes"][7])
    assert [line[:16] for line in bars] == sorted(
        m.replace("T", " ") for m in expected["waypoint_minutes"][7]
    )

    top = viewevents_cli(
        stack,
        "top",
        "--start",
        "2026-11-28T00:00:00Z",
        "--end",
        "2026-11-29T00:00:00Z",
        "--metric",
        "unique-viewers",
        "--limit",
        "2",
    )
    rows = top.stdout.splitlines()[2:4]
    assert [int(r.split()[1]) for r in rows] == expected["top3"][:2]
    assert "next page: --page-token" in top.stdout

    similar = viewevents_cli(stack, "similar", "7", "--metric", "pearson")
    assert similar.stdout.splitlines()[2].split()[0] == "8"
    recommend = viewevents_cli(stack, "recommend", "42", "--json")
    assert int(json.loads(recommend.stdout)["recommendations"][0]["mediaId"]) == 10

    bad = viewevents_cli(stack, "similar", "-3")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "media_id" in bad.stderr
    missing = viewevents_cli(stack, "stats", "999999")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_consumer_metrics_are_exported(stack: dict[str, str]) -> None:
    import urllib.request

    page = (
        urllib.request.urlopen(f"http://127.0.0.1:{stack['stats_metrics']}/metrics", timeout=5)
        .read()
        .decode()
    )
    applied = re.search(r'viewevents_events_applied_total\{service="stats"\} ([0-9.e+]+)', page)
    # every distinct event once: the upload plus the published event (the re-sent copies are duplicates)
    assert applied and float(applied.group(1)) == expected_from_examples()["uploaded"] + 1
    assert re.search(r'viewevents_duplicate_events_total\{service="stats"\} ([1-9][0-9.e+]*)', page)
    assert (
        'viewevents_rpc_duration_seconds_count{code="OK",method="GetMediaStats",service="stats"}'
        in page
    )
    assert re.search(r'viewevents_rocksdb_size_bytes\{service="stats"\} [1-9]', page)
