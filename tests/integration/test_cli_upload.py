"""`viewevents upload` end to end: file lines in, summary and file:line problems out."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.broker import read_topic
from tests.support.configs import REPO
from tests.support.processes import ServiceProcess
from viewevents.v1 import view_event_pb2 as ve


@pytest.mark.parametrize("mode", ["Upload", "UploadStream"])
def test_upload_reports_problems_by_file_and_line(
    ingest: ServiceProcess, tmp_path: Path, mode: str
) -> None:
    now = int(time.time())

    def legacy(n: int, **changes: object) -> str:
        line = {
            "EventId": f"cli-{n}",
            "MediaId": 3,
            "UserId": 8,
            "EventType": "waypoint",
            "Timestamp": now - 100 + n,
        }
        line.update(changes)
        return json.dumps({k: v for k, v in line.items() if v is not None})

    lines = [legacy(n) for n in range(10)]
    lines[2] = "this is not json"  # line 3
    lines[4] = legacy(4, MediaId="abc")  # line 5: client-side
    lines[6] = legacy(6, UserId=None)  # line 7: server rejects
    lines[8] = legacy(
        8, DateTime=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 5000))
    )  # line 9
    first = tmp_path / "first.jsonl"
    first.write_text("\n".join(lines) + "\n")
    second = tmp_path / "second.jsonl"
    second.write_text(
        "\n".join([legacy(100), "", legacy(101, EventType="pause"), legacy(102, MediaId=-1)]) + "\n"
    )

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "viewevents_tools.cli",
            "upload",
            str(first),
            str(second),
            "--address",
            ingest.address,
            "--batch-size",
            "3",
            "--no-progress",
            *(["--resumable"] if mode == "UploadStream" else []),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    problems = result.stderr
    assert f"{first}:3: not an event" in problems
    assert re.search(rf"{re.escape(str(first))}:5: rejected: .*MediaId", problems)
    assert re.search(
        rf"{re.escape(str(first))}:7: rejected by the server: user_id is required", problems
    )
    assert re.search(rf"{re.escape(str(first))}:9: rejected: .*DateTime.*Timestamp", problems)
    assert re.search(rf"{re.escape(str(second))}:3: rejected: .*pause", problems)
    assert re.search(
        rf"{re.escape(str(second))}:4: rejected by the server: media_id must be positive", problems
    )
    # 13 event lines: 1 not JSON, 3 rejected before sending, 9 sent of which 2 rejected by the server.
    assert "sent 9 events in 3 requests: 7 accepted, 2 rejected by the server" in result.stdout
    assert "3 lines rejected before sending, 1 lines not events" in result.stdout
    landed = sorted(
        ve.ViewEvent.FromString(r.value).event_id
        for r in read_topic(ingest.config.kafka_bootstrap, ingest.config.view_topic)
    )
    assert landed == sorted(
        f"cli-{n}" for n in (0, 1, 3, 5, 7, 9, 100) for _ in range(uploads_so_far(mode))
    )


def uploads_so_far(mode: str) -> int:
    """Both modes write to the module's topic: the second run finds each event twice."""
    return 1 if mode == "Upload" else 2


def test_dead_letters_command_shows_rejections(ingest: ServiceProcess) -> None:
    """Runs after the uploads above: their server-side rejections are on the topic."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "viewevents_tools.cli",
            "dead-letters",
            "--bootstrap",
            ingest.config.kafka_bootstrap,
            "--topic",
            ingest.config.dead_letter_topic,
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rejected = [json.loads(line) for line in result.stdout.splitlines()]
    by_id = {r["event"].get("eventId"): r for r in rejected}
    assert {"cli-6", "cli-102"} <= set(by_id)
    assert by_id["cli-6"]["fieldViolations"][0]["field"] == "user_id"
    assert by_id["cli-102"]["source"] in {"Upload", "UploadStream"}
