"""Run the stats service: python -m stats_service [--flags]; see --help for every setting."""

from __future__ import annotations

from collections.abc import Sequence

from stats_service.processor import StatsProcessor
from stats_service.reader import StatsReader
from stats_service.request_parsing import Limits, page_token_secret
from stats_service.servicer import SERVICE, StatsServicer
from stats_service.settings import SETTINGS
from viewevents import bootstrap
from viewevents.config import Config


async def serve(config: Config) -> None:
    limits = Limits(max_trend_buckets=config.stats_max_trend_buckets,
                    default_page_size=config.stats_default_page_size,
                    max_page_size=config.stats_max_page_size,
                    max_concurrent_scans=config.stats_max_concurrent_scans)
    endpoint = bootstrap.Endpoint(name="stats", descriptor=SERVICE, address=config.stats_address,
                                  metrics_port=config.stats_metrics_port,
                                  token=config.stats_token)
    await bootstrap.serve_consumer(
        config, endpoint, state_dir=config.stats_state_dir, group_id=config.stats_group,
        make_processor=lambda store: StatsProcessor(config.heartbeat_seconds,
                                                    config.stats_trend_retention_days),
        make_servicer=lambda store, consumer, processor: StatsServicer(
            StatsReader(store, config.stats_rank_chunk_rows), consumer, limits,
            page_token_secret(config.stats_page_token_secret)))


def main(argv: Sequence[str] | None = None) -> None:
    bootstrap.main("stats_service", __doc__, SETTINGS, serve, argv)


if __name__ == "__main__":
    main()
