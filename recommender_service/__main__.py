"""Run the recommender service: python -m recommender_service [--flags]; see --help."""

from __future__ import annotations

import inspect
import logging
from typing import Any

from recommender_service import settings as local_settings
from recommender_service.processor import RecommenderProcessor
from recommender_service.queries import QueryEngine
from recommender_service.server import RecommenderServicer
from viewevents import config as settings
from viewevents.consumer import ExactlyOnceConsumer, Processor
from viewevents.consumer_service import run_consumer_service
from viewevents.state import StateStore
from viewevents.v1 import recommender_service_pb2

log = logging.getLogger("recommender_service")

SERVICE = recommender_service_pb2.DESCRIPTOR.services_by_name["RecommenderService"]


async def serve(config: settings.Config, options: local_settings.RecommenderSettings) -> None:
    engines: list[QueryEngine] = []

    def make_processor(store: StateStore) -> Processor:
        return RecommenderProcessor(store, config.view_topic, options)

    def make_servicer(store: StateStore, consumer: ExactlyOnceConsumer,
                      processor: Processor) -> RecommenderServicer:
        assert isinstance(processor, RecommenderProcessor)
        engine = QueryEngine(lambda: processor.view, options)
        engine.start_warmer(consumer.caught_up.is_set)
        engines.append(engine)
        return RecommenderServicer(engine, consumer)

    log.info("recommender settings: %s", options)
    extra: dict[str, Any] = {}
    if "metrics_port" in inspect.signature(run_consumer_service).parameters:
        extra["metrics_port"] = getattr(config, "recommender_metrics_port", 0)
    try:
        await run_consumer_service(
            config, name="recommender", address=config.recommender_address,
            state_dir=config.recommender_state_dir, group_id=config.recommender_group,
            service_descriptor=SERVICE, make_processor=make_processor,
            make_servicer=make_servicer, **extra)
    finally:
        for engine in engines:
            engine.stop_warmer()


def main(argv: list[str] | None = None) -> None:
    settings.run_service("recommender_service", "recommender", __doc__,
                         lambda config: serve(config, local_settings.from_config(config)), argv)


if __name__ == "__main__":
    main()
