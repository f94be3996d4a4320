"""Run the stats service: python -m stats_service [--flags]; see --help for every setting."""

from __future__ import annotations

from stats_service.processor import StatsProcessor
from stats_service.queries import Limits
from stats_service.server import SERVICE, StatsService
from stats_service.store import StatsReader
from viewevents import config as settings
from viewevents.consumer_service import run_consumer_service


def limits_of(config: settings.Config) -> Limits:
    """Query limits; read with defaults until viewevents/config.py declares these settings."""
    return Limits(
        max_trend_buckets=config.stats_max_trend_buckets,
        default_page_size=config.stats_default_page_size,
        max_page_size=config.stats_max_page_size,
    )


async def serve(config: settings.Config) -> None:
    retention_days = config.stats_trend_retention_days
    await run_consumer_service(
        config,
        name="stats",
        address=config.stats_address,
        state_dir=config.stats_state_dir,
        group_id=config.stats_group,
        service_descriptor=SERVICE,
        make_processor=lambda store: StatsProcessor(config.heartbeat_seconds, retention_days),
        make_servicer=lambda store, consumer, processor: StatsService(
            StatsReader(store), consumer, limits_of(config)),
        metrics_port=config.stats_metrics_port,
    )


def main(argv: list[str] | None = None) -> None:
    settings.run_service("stats_service", "stats", __doc__, serve, argv)


if __name__ == "__main__":
    main()
