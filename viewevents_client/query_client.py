"""Typed query client for the stats and recommender services (the CLI and demo use it)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from viewevents.v1 import recommender_service_pb2 as rec_pb
from viewevents.v1 import recommender_service_pb2_grpc as rec_grpc
from viewevents.v1 import stats_service_pb2 as stats_pb
from viewevents.v1 import stats_service_pb2_grpc as stats_grpc
from viewevents_client.uploads import open_channel

GRANULARITIES = {
    "minute": stats_pb.GRANULARITY_MINUTE,
    "hour": stats_pb.GRANULARITY_HOUR,
    "day": stats_pb.GRANULARITY_DAY,
}
TOP_METRICS = {
    "view-time": stats_pb.TOP_MEDIA_METRIC_VIEW_TIME,
    "starts": stats_pb.TOP_MEDIA_METRIC_STARTS,
    "unique-viewers": stats_pb.TOP_MEDIA_METRIC_UNIQUE_VIEWERS,
}
SIMILARITY = {
    "cosine": rec_pb.SIMILARITY_METRIC_COSINE,
    "pearson": rec_pb.SIMILARITY_METRIC_PEARSON,
}


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    return stamp


class QueryClient:
    """Stats and recommender queries over one channel each; each service may have its own
    bearer token (VIEWEVENTS_STATS_TOKEN, VIEWEVENTS_RECOMMENDER_TOKEN on the server)."""

    def __init__(
        self,
        stats_address: str,
        recommender_address: str,
        tls_ca: str | None = None,
        stats_token: str | None = None,
        recommender_token: str | None = None,
    ) -> None:
        self._stats_channel = open_channel(stats_address, tls_ca, stats_token)
        self._recommender_channel = open_channel(recommender_address, tls_ca, recommender_token)
        self.stats = stats_grpc.StatsServiceStub(self._stats_channel)
        self.recommender = rec_grpc.RecommenderServiceStub(self._recommender_channel)

    def close(self) -> None:
        self._stats_channel.close()
        self._recommender_channel.close()

    def __enter__(self) -> QueryClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def media_stats(self, media_id: int) -> stats_pb.GetMediaStatsResponse:
        return self.stats.GetMediaStats(
            stats_pb.GetMediaStatsRequest(media_id=media_id), timeout=10
        )

    def media_trend(
        self,
        media_id: int,
        start: datetime,
        end: datetime,
        granularity: str = "hour",
        include_empty: bool = False,
    ) -> stats_pb.GetMediaTrendResponse:
        return self.stats.GetMediaTrend(
            stats_pb.GetMediaTrendRequest(
                media_id=media_id,
                start_time=timestamp(start),
                end_time=timestamp(end),
                granularity=GRANULARITIES[granularity],
                include_empty_buckets=include_empty,
            ),
            timeout=30,
        )

    def top_media(
        self,
        start: datetime,
        end: datetime,
        metric: str = "view-time",
        limit: int = 10,
        page_token: str = "",
    ) -> stats_pb.ListTopMediaResponse:
        return self.stats.ListTopMedia(
            stats_pb.ListTopMediaRequest(
                start_time=timestamp(start),
                end_time=timestamp(end),
                metric=TOP_METRICS[metric],
                limit=limit,
                page_token=page_token,
            ),
            timeout=30,
        )

    def iter_top_media(
        self, start: datetime, end: datetime, metric: str = "view-time", page_size: int = 100
    ) -> Iterator[stats_pb.TopMedia]:
        """Every ranked item in the range, page after page."""
        token = ""
        while True:
            page = self.top_media(start, end, metric, page_size, token)
            yield from page.media
            token = page.next_page_token
            if not token:
                return

    def similar_media(
        self, media_id: int, limit: int = 10, metric: str = "cosine"
    ) -> rec_pb.GetSimilarMediaResponse:
        return self.recommender.GetSimilarMedia(
            rec_pb.GetSimilarMediaRequest(
                media_id=media_id, limit=limit, metric=SIMILARITY[metric]
            ),
            timeout=10,
        )

    def recommend(self, user_id: int, limit: int = 10) -> rec_pb.RecommendForUserResponse:
        return self.recommender.RecommendForUser(
            rec_pb.RecommendForUserRequest(user_id=user_id, limit=limit), timeout=10
        )

    def wait_caught_up(self, timeout: float = 300.0) -> None:
        """Until both consumers report SERVING (caught up with Kafka at their start)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        for channel in (self._stats_channel, self._recommender_channel):
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("services not caught up in time")
                time.sleep(0.5)
