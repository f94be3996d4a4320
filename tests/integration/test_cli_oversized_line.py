"""`viewevents upload` with one line too big to upload: reported by file:line, the rest lands."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO, ServiceProcess, read_topic
from viewevents.v1 import view_event_pb2 as ve


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["Upload", "UploadStream"])
def test_an_oversized_line_is_skipped_by_file_and_line(
    ingest: ServiceProcess, tmp_path: Path, mode: str
) -> None:
    now = int(time.time())
    path = tmp_path / "events.jsonl"
    with path.open("w") as out:
        for n in range(10_001):
            event_id = "big-" + "x" * (9 * 1024 * 1024) if n == 5_000 else f"{mode}-{n}"
            out.write(
                json.dumps(
                    {
                        "EventId": event_id,
                        "MediaId": 3,
                        "UserId": 1 + n % 97,
                        "EventType": "waypoint",
                        "Timestamp": now - 100,
                    }
                )
                + "\n"
            )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "viewevents_tools.cli",
            "upload",
            str(path),
            "--address",
            ingest.address,
            "--no-progress",
            *(["--resumable"] if mode == "UploadStream" else []),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{path}:5001: skipped, too large" in result.stderr
    assert "10000 accepted, 0 rejected by the server" in result.stdout
    assert "1 lines skipped as too large to upload" in result.stdout
    landed = {
        ve.ViewEvent.FromString(r.value).event_id
        for r in read_topic(ingest.config.kafka_bootstrap, ingest.config.view_topic)
    }
    assert {i for i in landed if i.startswith(f"{mode}-")} == {
        f"{mode}-{n}" for n in range(10_001) if n != 5_000
    }
