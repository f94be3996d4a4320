"""Typed keyword arguments of the stats request messages, for tests that build requests from
dicts of fields (a base request and its variations): `pb.ListTopMediaRequest(**fields)` then
type-checks field by field."""

from __future__ import annotations

from typing import TypedDict

from viewevents.v1 import stats_service_pb2 as pb

Time = dict[str, int]  # {"seconds": ..., "nanos": ...}, as the message constructors accept


class Span(TypedDict, total=False):
    """The time range of pb.ListTopMediaRequest: a base request the tests add fields to."""

    start_time: Time
    end_time: Time


class TopFields(Span, total=False):
    """Fields of pb.ListTopMediaRequest (page_token apart: the tests pass it separately)."""

    metric: pb.TopMediaMetric
    limit: int


class TrendFields(TypedDict, total=False):
    """Fields of pb.GetMediaTrendRequest."""

    media_id: int
    start_time: Time
    end_time: Time
    granularity: pb.Granularity
    include_empty_buckets: bool
