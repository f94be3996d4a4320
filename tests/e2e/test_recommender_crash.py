"""kill -9 the recommender again and again during a large upload: its statistics stay exact.

Every sufficient statistic (N, and S, Q, n of every item, D and c of every co-viewed pair) is
read straight from RocksDB after the last restart caught up, and must equal the brute-force
matrix of the accepted events: nothing lost, nothing counted twice, whatever instant each kill
hit. Restarts join under a fresh consumer-group id (offsets come from RocksDB; a fresh id only
spares Kafka's session timeout before a killed member's partitions are handed on).
"""

from __future__ import annotations

import re
from pathlib import Path

from recommender_service import key_layout as keys
from tests.support.configs import free_port, test_config, unique_name
from tests.support.data import accepted_events, generated_events
from tests.support.oracles import BruteForce
from tests.support.positions import applied_records, recommender_position, wait_applied
from tests.support.processes import ServiceProcess
from tests.support.uploads import PartedUpload
from tests.support.waits import wait_for
from viewevents.state.store import StateStore

KILLS = 4
EVENTS = 300_000


def resumed_from(log: Path) -> int | None:
    """Records already applied when a restarted service resumed (from its log), if it got there."""
    found = re.search(r"resuming from stored offsets \{([^}]*)\}", log.read_text(errors="replace"))
    if found is None:
        return None
    return sum(int(v) for v in re.findall(r"\d+: (\d+)", found.group(1)))


def test_kill_minus_nine_keeps_every_statistic_exact(kafka_bootstrap: str, tmp_path: Path) -> None:
    events = generated_events(
        tmp_path / "events.jsonl", EVENTS, 21, users=3_000, media=300, groups=10, noise=0.02
    )
    config = test_config(
        kafka_bootstrap,
        ingest_address=f"127.0.0.1:{free_port()}",
        recommender_address=f"127.0.0.1:{free_port()}",
        consume_batch_max=4_000,
        recommender_state_dir=str(tmp_path / "state"),
        recommender_group=unique_name("rec"),
        recommender_history_cap=100_000,
        recommender_row_max_deltas=4,
    )  # compactions get killed too
    ingest = ServiceProcess(
        "ingest_service", config, config.ingest_address, tmp_path / "ingest.log"
    ).start()
    service = ServiceProcess(
        "recommender_service", config, config.recommender_address, tmp_path / "rec-0.log"
    ).start()
    try:
        ingest.wait_serving()
        service.wait_serving()
        uploader = PartedUpload(config.ingest_address, events, KILLS + 1, 4_000).start()
        seen_at_kill: list[int | None] = []
        last = 0
        for kill in range(KILLS):
            # Kill once this incarnation has applied records beyond the previous kill.
            def progressed(floor: int = last) -> int | None:
                n = applied_records(config.recommender_address, recommender_position)
                return n if n is not None and n > floor else None

            last = wait_for(
                progressed,
                timeout=180,
                message=f"progress before kill {kill + 1}",
            )
            seen_at_kill.append(last)
            service.kill()
            restarted = config.replace(recommender_group=unique_name("rec-crash"))
            service = ServiceProcess(
                "recommender_service",
                restarted,
                config.recommender_address,
                tmp_path / f"rec-{kill + 1}.log",
            ).start()
            uploader.release()
        total = uploader.finish()
        # The kills hit a service that had applied part of the stream, not an idle one.
        resumed = [resumed_from(tmp_path / f"rec-{k + 1}.log") for k in range(KILLS)]
        partial = [n for n in resumed + seen_at_kill if n is not None and 0 < n < total]
        assert partial, f"no kill hit a service mid-stream: {resumed}, {seen_at_kill} of {total}"
        wait_applied(config.recommender_address, recommender_position, total, timeout=180)
    finally:
        stopped = service.stop()
        ingest.stop()
    assert stopped == 0, service.tail()  # a clean SIGTERM after the last restart

    truth = BruteForce(accepted_events(events))
    store = StateStore(str(tmp_path / "state"))
    try:
        partitions = keys.partitions_in(store)
        users, items = keys.stored_items(store, partitions)
        assert users == truth.n_users
        assert items == truth.item_stats()
        pairs = keys.stored_pairs(store, partitions)
        assert len(pairs) > 10_000
        assert pairs == truth.pairs()
    finally:
        store.close()
