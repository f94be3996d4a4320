"""Run the stats service: python -m stats_service [--flags]; see --help for every setting."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from stats_service.processor import StatsProcessor
from stats_service.reader import StatsReader
from stats_service.request_parsing import Limits, page_token_secret
from stats_service.rollups import LOG_KEY_BYTES, BucketVersions, RollupCache
from stats_service.servicer import PARTITION_SERVICE, SERVICE, StatsServicer
from stats_service.settings import SETTINGS
from stats_service.top_cache import PageCache, page_cache_bytes
from stats_service.top_media import RollupRanker
from viewevents import bootstrap
from viewevents.config import Config
from viewevents.membership import advertised_address
from viewevents.metrics import watch_cache
from viewevents.state.store import StateStore

log = logging.getLogger("stats_service")


async def serve(config: Config) -> None:
    limits = Limits(
        max_trend_buckets=config.stats_max_trend_buckets,
        default_page_size=config.stats_default_page_size,
        max_page_size=config.stats_max_page_size,
        max_concurrent_scans=config.stats_max_concurrent_scans,
    )
    advertised = advertised_address(config.stats_address, config.stats_advertised_address)
    endpoint = bootstrap.Endpoint(
        name="stats",
        descriptor=SERVICE,
        address=config.stats_address,
        metrics_port=config.stats_metrics_port,
        token=config.stats_token,
        advertised_address=advertised,
        extra=(PARTITION_SERVICE,),
    )
    if not config.stats_page_token_secret:
        log.warning(
            "no stats_page_token_secret: ListTopMedia page tokens are valid only on this "
            "instance; set the same secret on every instance behind one address"
        )
    peer_metadata = (
        [("authorization", f"Bearer {config.stats_token}")] if config.stats_token else []
    )
    # Rollups are the stats service's own cache: charged to the memory budget unless sized.
    rollup_mb = config.stats_rollup_cache_mb or bootstrap.memory_plan(config).service_cache_mb
    cache_bytes = max(0, rollup_mb) << 20
    # Finished pages share the rollups' memory: their bytes are taken out of that budget.
    page_bytes = page_cache_bytes(cache_bytes, config.stats_top_page_cache_kb)
    if config.stats_top_page_cache_kb << 10 > page_bytes:
        log.warning(
            "stats_top_page_cache_kb=%d is capped at half the rollup cache (%d KiB): the "
            "rollups keep the other half",
            config.stats_top_page_cache_kb,
            page_bytes >> 10,
        )
    # The log of changed keys that lets cached rollups be refreshed: a sixteenth of the rest.
    log_bytes = (cache_bytes - page_bytes) // 16
    versions = BucketVersions(log_keys=log_bytes // LOG_KEY_BYTES)

    def make_servicer(store: StateStore, consumer: Any, processor: Any) -> StatsServicer:
        ranker = None
        if cache_bytes:
            ranker = RollupRanker(
                store, RollupCache(versions, cache_bytes - page_bytes - log_bytes)
            )
            watch_cache("stats", "rollups", ranker.cache.counts)
        servicer = StatsServicer(
            StatsReader(store, config.stats_rank_chunk_rows),
            consumer,
            limits,
            page_token_secret(config.stats_page_token_secret),
            peers=bootstrap.peers(config),
            peer_metadata=peer_metadata,
            ranker=ranker,
            pages=PageCache(page_bytes),
        )
        servicer.start_rollup_warmer()
        return servicer

    await bootstrap.serve_consumer(
        config,
        endpoint,
        state_dir=config.stats_state_dir,
        group_id=config.stats_group,
        make_processor=lambda store: StatsProcessor(
            config.heartbeat_seconds,
            config.stats_trend_retention_days,
            versions,
            config.stats_minute_retention_days,
        ),
        make_servicer=make_servicer,
    )


def main(argv: Sequence[str] | None = None) -> None:
    bootstrap.main("stats_service", __doc__, SETTINGS, serve, argv)


if __name__ == "__main__":
    main()
