"""The real grpcurl against the ingest service: reflection and a client-streaming Upload."""

from __future__ import annotations

import json
import time

from tests.support.broker import read_topic
from tests.support.grpcurl import grpcurl
from tests.support.processes import ServiceProcess
from viewevents.v1 import view_event_pb2 as ve


def test_list_and_describe_through_reflection(ingest: ServiceProcess) -> None:
    listed = grpcurl(ingest.address, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {"viewevents.v1.IngestService", "grpc.health.v1.Health"}
    described = grpcurl(ingest.address, "describe", "viewevents.v1.IngestService")
    assert described.returncode == 0, described.stderr
    assert (
        "rpc Upload ( stream .viewevents.v1.UploadRequest ) returns ( .viewevents.v1.UploadSummary )"
        in described.stdout
    )
    health = grpcurl(ingest.address, "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout) == {"status": "SERVING"}


def test_client_streaming_upload_from_stdin(ingest: ServiceProcess) -> None:
    now = int(time.time())
    requests = []
    for batch in range(3):
        events = [
            {
                "eventId": f"curl-{batch}-{n}",
                "mediaId": str(10 + n),
                "userId": str(100 + batch),
                "eventType": "EVENT_TYPE_WAYPOINT",
                "eventTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 60 * n)),
            }
            for n in range(4)
        ]
        requests.append(json.dumps({"events": events}))
    requests.append(
        json.dumps({"events": [{"eventId": "curl-bad", "mediaId": "0", "userId": "5"}]})
    )
    result = grpcurl(
        "-d", "@", ingest.address, "viewevents.v1.IngestService/Upload", stdin="\n".join(requests)
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (
        summary["received"] == "13" and summary["accepted"] == "12" and summary["rejected"] == "1"
    )
    assert {v["field"] for v in summary["rejections"][0]["field_violations"]} == {
        "media_id",
        "event_type",
        "event_time",
    }
    landed = {
        ve.ViewEvent.FromString(r.value).event_id
        for r in read_topic(ingest.config.kafka_bootstrap, ingest.config.view_topic)
    }
    assert landed == {f"curl-{b}-{n}" for b in range(3) for n in range(4)}


def test_publish_error_details_are_readable(ingest: ServiceProcess) -> None:
    result = grpcurl(
        "-d",
        '{"events": [{"eventId": "x", "mediaId": "-3"}]}',
        ingest.address,
        "viewevents.v1.IngestService/Publish",
    )
    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr
    assert "google.rpc.BadRequest" in result.stderr and "events[0].media_id" in result.stderr
