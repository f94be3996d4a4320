"""kill -9 the stats service again and again while a large upload runs: counts stay exact.

The consumed offsets live in the same RocksDB write batch as the state they produced, so a
restart resumes exactly where the last committed batch ended, whatever instant the kill hit.
Each restart joins under a fresh consumer-group id: the group only hands out partitions (the
offsets come from RocksDB), and a fresh id spares the test Kafka's 30 s session timeout before
a killed member's partitions are handed on.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from tests.support.broker import end_offsets
from tests.support.configs import unique_name
from tests.support.data import STATS_FILE, accepted_events, first_copies, generated_events
from tests.support.oracles import Expected, check_all_totals
from tests.support.positions import applied_records, stats_position, wait_applied
from tests.support.processes import ServiceProcess, ingest_and_stats
from tests.support.uploads import PartedUpload
from tests.support.waits import wait_for
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import stats_service_pb2_grpc as pb_grpc
from viewevents_client.uploads import CHANNEL_OPTIONS

KILLS = 4


def test_kill_minus_nine_during_upload_loses_and_doubles_nothing(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    events = generated_events(tmp_path / "views.jsonl", 320_000, seed=33, **STATS_FILE)
    config, ingest, stats = ingest_and_stats(tmp_path, kafka_bootstrap)
    ingest.start()
    stats.start()
    try:
        ingest.wait_serving()
        stats.wait_serving()
        uploader = PartedUpload(config.ingest_address, events, KILLS + 1, 5_000).start()
        seen_at_kill: list[int | None] = []
        last = 0
        for kill in range(KILLS):
            # Kill once this incarnation has applied records beyond the previous kill.
            def progressed(floor: int = last) -> int | None:
                n = applied_records(config.stats_address, stats_position)
                return n if n is not None and n > floor else None

            last = wait_for(
                progressed,
                timeout=180,
                message=f"progress before kill {kill + 1}",
            )
            seen_at_kill.append(last)
            stats.kill()
            restarted = config.replace(stats_group=unique_name("stats-crash"))
            stats = ServiceProcess(
                "stats_service", restarted, config.stats_address, tmp_path / f"stats-{kill + 1}.log"
            ).start()
            uploader.release()
        total = uploader.finish()
        targets = end_offsets(kafka_bootstrap, config.view_topic)
        assert sum(targets.values()) == total
        # The kills hit a service that had applied part of the stream, not an idle one.
        partial = [n for n in seen_at_kill if n is not None and 0 < n < total]
        assert partial, seen_at_kill
        good = first_copies(accepted_events(events, config))
        expected = Expected(good)
        wait_applied(config.stats_address, stats_position, targets, timeout=180)
        with grpc.insecure_channel(config.stats_address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.StatsServiceStub(channel)
            check_all_totals(stub, expected)
            low = min(r[3] for r in expected.rows)
            high = max(r[3] for r in expected.rows)
            reply = stub.ListTopMedia(
                pb.ListTopMediaRequest(
                    start_time={"seconds": low},
                    end_time={"seconds": high + 1},
                    metric=pb.TOP_MEDIA_METRIC_UNIQUE_VIEWERS,
                    limit=1000,
                ),
                timeout=60,
            )
            want = expected.top(
                low - low % 60, -(-(high + 1) // 60) * 60, pb.TOP_MEDIA_METRIC_UNIQUE_VIEWERS
            )
            assert [
                (m.media_id, m.rank, m.view_time_seconds, m.starts, m.unique_viewers)
                for m in reply.media
            ] == want[:1000]
    finally:
        stats.stop()
        ingest.stop()
