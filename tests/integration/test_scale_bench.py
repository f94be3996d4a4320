"""The scale-out bench section runs end to end with tiny sizes, so it cannot rot.

Only the parts that need no session timeout (consume, latency, and freshness with 2 instances;
stats only): failover and takeover each wait 10 s for the group to drop a killed member, which
would make this test slow. Figures are not checked here: speed is the bench's business, not a test's.
"""

from __future__ import annotations

import asyncio

from benchmarks import scale, scratch
from tests.support.broker import topic_names
from tests.support.waits import wait_for


def test_scale_section_prints_every_table(kafka_bootstrap: str) -> None:
    options = scale.Options(
        events=20_000,
        partitions=4,
        calls=40,
        upload_events=20_000,
        idle_probes=5,
        freshness_instances=(2,),
        freshness_max_lags=(0, 2_000),
        parts=("consume", "latency", "freshness"),
        services=("stats",),
    )
    before = asyncio.run(topic_names(kafka_bootstrap))
    try:
        tables = scale.run_bench(kafka_bootstrap, options)
    finally:
        # What the bench's process would do at exit, done here while the test broker is up
        # (at pytest's exit it is gone, and the deletion could only warn).
        scratch.drop_scratch_topics()
    # The bench left no topic (deletion is asynchronous on the broker: wait for the listing).
    wait_for(lambda: asyncio.run(topic_names(kafka_bootstrap)) <= before, timeout=60)
    rows = {title.split(":")[0].split(" ")[0]: table["rows"] for title, table in tables.items()}
    assert [row[1] for row in rows["consume"]] == [1, 2]  # 1 and 2 instances
    assert all(row[2] > 0 for row in rows["consume"])
    assert len(rows["query"]) == 4  # every stats RPC, through 1 and 2 instances
    assert all(row[-1] == "0 / 0" for row in rows["query"])  # no errors
    assert [row[:3] for row in rows["freshness"]][::2] == [
        [2, "off", "idle"],
        [2, "2,000 records", "idle"],
    ]
    assert len(rows["freshness"]) == 4
    assert all(not row[3].startswith("0 ") and row[3].endswith("(0)") for row in rows["freshness"])
