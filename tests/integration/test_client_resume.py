"""The resumable client upload survives the ingest service being killed mid-stream."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc

from tests.support.broker import read_topic
from tests.support.configs import free_port, test_config
from tests.support.data import make_events
from tests.support.processes import ServiceProcess
from viewevents.v1 import view_event_pb2 as ve
from viewevents_client.uploads import CHANNEL_OPTIONS, upload_resumable


def test_upload_resumes_after_kill_and_restart(kafka_bootstrap: str, tmp_path: Path) -> None:
    config = test_config(kafka_bootstrap, ingest_address=f"127.0.0.1:{free_port()}")
    service = ServiceProcess(
        "ingest_service", config, config.ingest_address, tmp_path / "log"
    ).start()
    service.wait_serving()
    events, _ = make_events(60_000, seed=71, bad_share=0)
    acks: list[int] = []
    killed = threading.Event()

    def on_ack(ack: object) -> None:
        acks.append(ack.sequence)  # type: ignore[attr-defined]
        if len(acks) == 10 and not killed.is_set():
            killed.set()
            service.kill()  # kill -9 mid-upload ...
            service.start()  # ... and bring it back on the same address

    totals = upload_resumable(
        lambda: grpc.insecure_channel(config.ingest_address, options=CHANNEL_OPTIONS),
        iter(events),
        batch_size=500,
        window=8,
        on_ack=on_ack,
        backoff_seconds=0.5,
        max_attempts=30,
    )
    service.stop()

    assert killed.is_set() and totals.reconnects >= 1
    assert totals.requests == 120 and totals.accepted == 60_000  # each batch acked exactly once
    landed = [
        ve.ViewEvent.FromString(r.value).event_id
        for r in read_topic(kafka_bootstrap, config.view_topic)
    ]
    assert set(landed) == {e.event_id for e in events}  # nothing lost
    assert len(landed) - len(events) <= 8 * 500  # re-sent at most the unacknowledged window
