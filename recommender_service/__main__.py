"""Run the recommender service: python -m recommender_service [--flags]; see --help."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from recommender_service.fanout import PARTITION_SERVICE, Fanout, Ownership
from recommender_service.processor import RecommenderProcessor
from recommender_service.query_engine import QueryEngine
from recommender_service.servicer import RecommenderServicer, warmer_ready
from recommender_service.settings import SETTINGS, from_config
from viewevents import bootstrap
from viewevents.config import Config
from viewevents.consumer import ExactlyOnceConsumer, Processor
from viewevents.membership import advertised_address
from viewevents.state.store import StateStore
from viewevents.v1 import recommender_service_pb2

log = logging.getLogger("recommender_service")

SERVICE = recommender_service_pb2.DESCRIPTOR.services_by_name["RecommenderService"]


async def serve(config: Config) -> None:
    options = from_config(config)
    log.info("recommender settings: %s", options)

    peers = bootstrap.peers(config)  # TLS to the other instances when this one serves TLS
    peer_metadata = (
        [("authorization", f"Bearer {config.recommender_token}")]
        if config.recommender_token
        else []
    )

    def make_processor(store: StateStore) -> Processor:
        return RecommenderProcessor(store, config.view_topic, options)

    def make_servicer(
        store: StateStore, consumer: ExactlyOnceConsumer, processor: Processor
    ) -> RecommenderServicer:
        assert isinstance(processor, RecommenderProcessor)
        engine = QueryEngine(lambda: processor.view, options)
        engine.start_warmer(warmer_ready(consumer))
        ownership = Ownership(lambda: processor.view, consumer)
        servicer = RecommenderServicer(
            engine, consumer, Fanout(ownership, options, peers, peer_metadata), processor.hot
        )
        servicer.start_fanout_warmer(consumer)
        return servicer

    endpoint = bootstrap.Endpoint(
        name="recommender",
        descriptor=SERVICE,
        address=config.recommender_address,
        metrics_port=config.recommender_metrics_port,
        token=config.recommender_token,
        advertised_address=advertised_address(
            config.recommender_address, config.recommender_advertised_address
        ),
        extra=(PARTITION_SERVICE,),
    )
    await bootstrap.serve_consumer(
        config,
        endpoint,
        state_dir=config.recommender_state_dir,
        group_id=config.recommender_group,
        make_processor=make_processor,
        make_servicer=make_servicer,
    )


def main(argv: Sequence[str] | None = None) -> None:
    bootstrap.main("recommender_service", __doc__, SETTINGS, serve, argv)


if __name__ == "__main__":
    main()
