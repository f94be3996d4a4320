"""Query logic without I/O: argument checks, range rounding and tiling, ranking, page tokens.

Kept apart from the gRPC handlers and RocksDB so that it is tested directly and quickly.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from google.protobuf import timestamp_pb2

from stats_service.key_layout import DAY, HOUR, MINUTE
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import view_event_pb2

Violation = view_event_pb2.FieldViolation

GRANULARITY_SECONDS = {
    pb.GRANULARITY_MINUTE: MINUTE,
    pb.GRANULARITY_HOUR: HOUR,
    pb.GRANULARITY_DAY: DAY,
}
METRICS = (
    pb.TOP_MEDIA_METRIC_VIEW_TIME,
    pb.TOP_MEDIA_METRIC_STARTS,
    pb.TOP_MEDIA_METRIC_UNIQUE_VIEWERS,
)
# What google.protobuf.Timestamp can hold: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
TIMESTAMP_MIN_SECONDS = -62_135_596_800
TIMESTAMP_MAX_SECONDS = 253_402_300_799
TOKEN_VERSION = 2
MAX_TOKEN_CHARS = 512
# A page token is `body.mac`, both URL-safe base64 without padding: body is the JSON
# {"v": version, "f": request fingerprint, "o": offset}, mac the first 16 bytes of its
# HMAC-SHA256 under the deployment's secret.
_MAC_BYTES = 16
# Used when no stats_page_token_secret is configured: tokens then die with the process and do
# not move between instances.
PROCESS_SECRET = secrets.token_bytes(32)


@dataclass(frozen=True)
class Limits:
    """Server-side bounds on query size."""

    max_trend_buckets: int = 10_000
    default_page_size: int = 10
    max_page_size: int = 1_000
    max_concurrent_scans: int = 2  # trends and rankings running at once; others wait


@dataclass(frozen=True)
class TrendQuery:
    media_id: int
    size: int
    start: int  # first bucket start (range start rounded down)
    end: int  # end of the last bucket (range end rounded up)
    include_empty: bool


@dataclass(frozen=True)
class TopQuery:
    start: int  # minute-aligned, inclusive
    end: int  # minute-aligned, exclusive
    metric: int
    limit: int
    offset: int
    fingerprint: str


def violation(field: str, description: str, reason: str) -> Violation:
    return Violation(field=field, description=description, reason=reason)


# --- time arithmetic --------------------------------------------------------------------------


def floor_to(seconds: int, size: int) -> int:
    return seconds // size * size


def ceil_to(seconds: int, size: int) -> int:
    return -(-seconds // size) * size


def ceil_seconds(ts: timestamp_pb2.Timestamp) -> int:
    """An exclusive end in whole seconds (a fraction of a second counts as the whole second)."""
    return ts.seconds + (1 if ts.nanos > 0 else 0)


def tiles(
    start: int, end: int, sizes: Sequence[int] = (DAY, HOUR, MINUTE)
) -> list[tuple[int, int, int]]:
    """Cover minute-aligned [start, end) with the fewest buckets: whole days in the middle,
    whole hours and then minutes at the ragged edges. Returns (size, first start, end) runs."""
    if start >= end or not sizes:
        return []
    size = sizes[0]
    low, high = ceil_to(start, size), floor_to(end, size)
    if low < high:
        return tiles(start, low, sizes[1:]) + [(size, low, high)] + tiles(high, end, sizes[1:])
    return tiles(start, end, sizes[1:])


# --- validation -------------------------------------------------------------------------------


def check_media_id(media_id: int, out: list[Violation]) -> None:
    if media_id <= 0:
        reason = "REQUIRED" if media_id == 0 else "NOT_POSITIVE"
        out.append(violation("media_id", f"media_id must be positive, got {media_id}", reason))


def check_range(request: object, out: list[Violation]) -> bool:
    """start_time and end_time present, representable, and not reversed; True when usable."""
    ok = True
    for name in ("start_time", "end_time"):
        if not request.HasField(name):  # type: ignore[attr-defined]
            out.append(violation(name, f"{name} is required", "REQUIRED"))
            ok = False
            continue
        ts = getattr(request, name)
        if not (
            TIMESTAMP_MIN_SECONDS <= ts.seconds <= TIMESTAMP_MAX_SECONDS
            and 0 <= ts.nanos < 1_000_000_000
        ):
            out.append(
                violation(
                    name,
                    f"{name} is not a valid timestamp (0001-01-01 to 9999-12-31 UTC)",
                    "OUT_OF_RANGE",
                )
            )
            ok = False
    if ok:
        start, end = request.start_time, request.end_time  # type: ignore[attr-defined]
        if (end.seconds, end.nanos) < (start.seconds, start.nanos):
            out.append(violation("end_time", "end_time is before start_time", "INVALID_RANGE"))
            ok = False
    return ok


def parse_trend(
    request: pb.GetMediaTrendRequest, limits: Limits
) -> tuple[TrendQuery | None, list[Violation]]:
    out: list[Violation] = []
    check_media_id(request.media_id, out)
    size = GRANULARITY_SECONDS.get(request.granularity)
    if size is None:
        if request.granularity == pb.GRANULARITY_UNSPECIFIED:
            out.append(
                violation(
                    "granularity", "granularity is required (MINUTE, HOUR or DAY)", "REQUIRED"
                )
            )
        else:
            out.append(
                violation(
                    "granularity",
                    f"granularity has unknown value {request.granularity}",
                    "UNKNOWN_VALUE",
                )
            )
    if check_range(request, out) and size is not None:
        start = floor_to(request.start_time.seconds, size)
        end = ceil_to(ceil_seconds(request.end_time), size)
        buckets = (end - start) // size
        if buckets > limits.max_trend_buckets:
            out.append(
                violation(
                    "end_time",
                    f"the range holds {buckets} buckets at this granularity; at most "
                    f"{limits.max_trend_buckets} are returned: narrow the range or use a "
                    "coarser granularity",
                    "TOO_MANY_BUCKETS",
                )
            )
        if not out:
            return TrendQuery(
                request.media_id, size, start, end, request.include_empty_buckets
            ), out
    return None, out


def parse_top(
    request: pb.ListTopMediaRequest, limits: Limits, secret: bytes | None = None
) -> tuple[TopQuery | None, list[Violation]]:
    """The query a request asks for; `secret` checks its page token (None: PROCESS_SECRET)."""
    out: list[Violation] = []
    metric = request.metric or pb.TOP_MEDIA_METRIC_VIEW_TIME
    if metric not in METRICS:
        out.append(
            violation("metric", f"metric has unknown value {request.metric}", "UNKNOWN_VALUE")
        )
    limit = request.limit or limits.default_page_size
    if not 1 <= limit <= limits.max_page_size:
        out.append(
            violation(
                "limit",
                f"limit must be 0 (default {limits.default_page_size}) or "
                f"1 to {limits.max_page_size}, got {request.limit}",
                "OUT_OF_RANGE",
            )
        )
    range_ok = check_range(request, out)
    fingerprint = request_fingerprint(request, metric)
    offset = 0
    if request.page_token:
        offset_or_error = decode_page_token(request.page_token, fingerprint, secret)
        if isinstance(offset_or_error, Violation):
            out.append(offset_or_error)
        else:
            offset = offset_or_error
    if out or not range_ok:
        return None, out
    start = floor_to(request.start_time.seconds, MINUTE)
    end = ceil_to(ceil_seconds(request.end_time), MINUTE)
    return TopQuery(start, end, metric, limit, offset, fingerprint), out


def check_partials(request: object) -> list[Violation]:
    """What is wrong with a StreamMediaPartialsRequest (another instance's): a minute-aligned
    range, at least one partition, no negative partition, positive media ids."""
    out: list[Violation] = []
    if check_range(request, out):
        for name in ("start_time", "end_time"):
            ts = getattr(request, name)
            if ts.nanos or ts.seconds % MINUTE:
                out.append(violation(name, f"{name} must be a whole minute", "NOT_MINUTE_ALIGNED"))
    partitions = list(request.partitions)  # type: ignore[attr-defined]
    if not partitions:
        out.append(violation("partitions", "partitions is required", "REQUIRED"))
    elif min(partitions) < 0:
        out.append(violation("partitions", "partitions must not be negative", "NEGATIVE"))
    if any(m <= 0 for m in request.media_ids):  # type: ignore[attr-defined]
        out.append(violation("media_ids", "media_ids must be positive", "NOT_POSITIVE"))
    return out


# --- ranking and pages --------------------------------------------------------------------------


def rank(values: dict[int, tuple[int, int, int]], metric: int) -> list[int]:
    """Media ids best first by the metric's column of (view_time, starts, unique_viewers);
    ties by media id ascending, so pages are stable. Every media item with an event in the
    range is ranked, including those whose metric is 0."""
    columns: dict[int, int] = {
        pb.TOP_MEDIA_METRIC_VIEW_TIME: 0,
        pb.TOP_MEDIA_METRIC_STARTS: 1,
        pb.TOP_MEDIA_METRIC_UNIQUE_VIEWERS: 2,
    }
    column = columns[metric]
    return sorted(values, key=lambda m: (-values[m][column], m))


METRIC_COLUMN: dict[int, int] = {
    pb.TOP_MEDIA_METRIC_VIEW_TIME: 0,
    pb.TOP_MEDIA_METRIC_STARTS: 1,
    pb.TOP_MEDIA_METRIC_UNIQUE_VIEWERS: 2,
}


class TopKeeper:
    """The best `keep` media items of a ranking fed in chunks, in the order of `rank`: memory
    is `keep` rows (32 bytes each) plus one chunk, whatever the number of media ranked."""

    def __init__(self, metric: int, keep: int) -> None:
        self.column = METRIC_COLUMN[metric]
        self.keep = keep
        self.media = np.zeros(0, np.int64)
        self.values = np.zeros((0, 3), np.int64)
        self.total = 0  # media items seen in all chunks

    def add(self, media: np.ndarray, values: np.ndarray) -> None:
        """A chunk: distinct media ids (no id in two chunks) and their (view_time, starts,
        unique_viewers) rows."""
        self.total += len(media)
        media = np.concatenate([self.media, media])
        values = np.concatenate([self.values, values])
        order = np.lexsort((media, -values[:, self.column]))[: self.keep]
        self.media, self.values = media[order], values[order]

    def page(
        self, offset: int, limit: int
    ) -> tuple[list[int], dict[int, tuple[int, int, int]], int | None]:
        """One page (ids best first, their rows) and the offset of the next (None: last)."""
        chosen = self.media[offset : offset + limit].tolist()
        rows = [tuple(r) for r in self.values[offset : offset + limit].tolist()]
        following = offset + limit
        return chosen, dict(zip(chosen, rows)), (following if following < self.total else None)


def request_fingerprint(request: pb.ListTopMediaRequest, metric: int) -> str:
    """What a page token is bound to: every request field except limit and page_token
    (AIP-158 lets the page size change between pages)."""
    parts = (
        request.start_time.seconds,
        request.start_time.nanos,
        request.end_time.seconds,
        request.end_time.nanos,
        metric,
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def page_token_secret(configured: str) -> bytes:
    """The key page tokens are signed with: the configured secret, else PROCESS_SECRET."""
    return configured.encode() if configured else PROCESS_SECRET


def _mac(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()[:_MAC_BYTES]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes | None:
    """Decoded bytes, or None unless `text` is their one canonical spelling (so no two
    tokens decode alike: base64's spare bits cannot be flipped unnoticed)."""
    try:
        data = base64.urlsafe_b64decode((text + "=" * (-len(text) % 4)).encode("ascii"))
    except (ValueError, UnicodeError, binascii.Error):
        return None
    return data if _b64(data) == text else None


def encode_page_token(fingerprint: str, offset: int, secret: bytes | None = None) -> str:
    """Opaque to clients: the offset and the request it belongs to, signed, so that a client
    can neither forge a token nor move one to another request or offset."""
    body = json.dumps(
        {"v": TOKEN_VERSION, "f": fingerprint, "o": offset}, separators=(",", ":")
    ).encode()
    return _b64(body) + "." + _b64(_mac(PROCESS_SECRET if secret is None else secret, body))


def decode_page_token(token: str, fingerprint: str, secret: bytes | None = None) -> int | Violation:
    """The offset a token stands for, or why it cannot be used with this request. The MAC is
    checked (in constant time) before anything inside the token is believed."""
    bad = violation(
        "page_token", "page_token is not a token this service issued", "INVALID_PAGE_TOKEN"
    )
    if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
        return bad
    body_text, mac_text = token.split(".")
    body, mac = _unb64(body_text), _unb64(mac_text)
    if body is None or mac is None or len(mac) != _MAC_BYTES:
        return bad
    if not hmac.compare_digest(mac, _mac(PROCESS_SECRET if secret is None else secret, body)):
        return bad
    try:
        document = json.loads(body)
    except ValueError:
        return bad
    offset = document.get("o") if isinstance(document, dict) else None
    if (
        document.get("v") != TOKEN_VERSION
        or not isinstance(offset, int)
        or isinstance(offset, bool)
        or offset < 0
    ):
        return bad
    if not hmac.compare_digest(str(document.get("f")), fingerprint):
        return violation(
            "page_token",
            "page_token belongs to a request with other start_time, "
            "end_time or metric: repeat that request's fields",
            "PAGE_TOKEN_MISMATCH",
        )
    return offset


def page(ranked: Sequence[int], offset: int, limit: int) -> tuple[list[int], int | None]:
    """One page of a ranking and the offset of the next page (None on the last)."""
    chosen = list(ranked[offset : offset + limit])
    following = offset + limit
    return chosen, (following if following < len(ranked) else None)


def empty_bucket_starts(start: int, end: int, size: int) -> Iterable[int]:
    return range(start, end, size)
