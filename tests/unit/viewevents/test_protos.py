"""The public contract: the names the product fixed (`make lint` runs buf lint on the protos)."""

from __future__ import annotations

from viewevents.v1 import (
    ingest_service_pb2,
    recommender_service_pb2,
    stats_service_pb2,
    view_event_pb2,
)


def test_contract_names() -> None:
    event_fields = {f.name for f in view_event_pb2.ViewEvent.DESCRIPTOR.fields}
    assert event_fields == {"event_id", "media_id", "user_id", "event_type", "event_time"}
    assert [v.name for v in view_event_pb2.EventType.DESCRIPTOR.values] == [
        "EVENT_TYPE_UNSPECIFIED",
        "EVENT_TYPE_STREAM_START",
        "EVENT_TYPE_WAYPOINT",
        "EVENT_TYPE_STREAM_STOP",
        "EVENT_TYPE_STREAM_END",
    ]
    ingest = ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"].methods_by_name
    assert (ingest["Upload"].client_streaming, ingest["Upload"].server_streaming) == (True, False)
    assert ingest["Upload"].output_type.name == "UploadSummary"
    assert (ingest["UploadStream"].client_streaming, ingest["UploadStream"].server_streaming) == (
        True,
        True,
    )
    assert ingest["UploadStream"].output_type.name == "UploadAck"
    assert ingest["Publish"].input_type.name == "PublishRequest"
    summary_fields = {f.name for f in ingest_service_pb2.UploadSummary.DESCRIPTOR.fields}
    assert {"received", "accepted", "rejected", "rejections"} <= summary_fields
    assert set(stats_service_pb2.DESCRIPTOR.services_by_name["StatsService"].methods_by_name) == {
        "GetMediaStats",
        "GetMediaTrend",
        "ListTopMedia",
    }
    assert set(
        recommender_service_pb2.DESCRIPTOR.services_by_name["RecommenderService"].methods_by_name
    ) == {"GetSimilarMedia", "RecommendForUser"}
