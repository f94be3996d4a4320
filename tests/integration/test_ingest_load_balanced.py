"""Ingest is stateless: two instances behind one client-side round_robin channel share a noisy
upload, and the topic holds exactly the valid events (each as many times as it was sent)."""

from __future__ import annotations

import urllib.request
from collections import Counter
from pathlib import Path

import grpc

from tests.support import ServiceProcess, free_port, read_topic, test_config
from tests.support.data import STATS_FILE, accepted_events, generated_events
from viewevents.v1 import view_event_pb2 as ve
from viewevents_client.uploads import CHANNEL_OPTIONS, upload

PARTS = 8


def received(metrics_port: int) -> float:
    """viewevents_events_received_total of the instance serving metrics on `metrics_port`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("viewevents_events_received_total "):
                return float(line.split()[1])
    return 0.0


def test_two_ingest_instances_behind_round_robin_store_exactly_the_valid_events(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    base = test_config(kafka_bootstrap)
    instances = []
    for name in ("one", "two"):
        config = base.replace(
            ingest_address=f"127.0.0.1:{free_port()}", ingest_metrics_port=free_port()
        )
        instances.append(
            ServiceProcess(
                "ingest_service", config, config.ingest_address, tmp_path / f"{name}.log"
            ).start()
        )
    try:
        for instance in instances:
            instance.wait_serving()
        events = generated_events(tmp_path / "views.jsonl", 16_000, seed=9, **STATS_FILE)
        target = "ipv4:" + ",".join(i.address for i in instances)
        options = [*CHANNEL_OPTIONS, ("grpc.lb_policy_name", "round_robin")]
        size = -(-len(events) // PARTS)
        with grpc.insecure_channel(target, options=options) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            summaries = [
                upload(channel, iter(events[i : i + size]), batch_size=1_000, timeout=120)
                for i in range(0, len(events), size)
            ]
        assert sum(s.received for s in summaries) == len(events)
        counts = [received(i.config.ingest_metrics_port) for i in instances]
        assert all(count > 0 for count in counts), counts  # both instances took uploads
        assert sum(counts) == len(events)

        valid = accepted_events(events, base)
        assert 0 < len(valid) < len(events)  # the file is noisy
        assert sum(s.accepted for s in summaries) == len(valid)
        stored = Counter(
            ve.ViewEvent.FromString(r.value).SerializeToString(deterministic=True)
            for r in read_topic(kafka_bootstrap, base.view_topic)
        )
        assert stored == Counter(e.SerializeToString(deterministic=True) for e in valid)
    finally:
        for instance in instances:
            instance.stop()
