"""ListTopMedia page tokens are signed: forged, altered, foreign or moved tokens are refused.

Pure: no RocksDB, no Kafka. The forgeries are built the way a client could build them, from
what it sees (the token text) and the documented request fields, never with the secret.
"""

from __future__ import annotations

import base64
import hashlib
import json
import string
from typing import Unpack

from stats_service import request_parsing
from tests.support.request_fields import TopFields
from viewevents.v1 import stats_service_pb2 as pb

LIMITS = request_parsing.Limits()
FIELDS = TopFields(
    start_time={"seconds": 1_767_225_600},
    end_time={"seconds": 1_767_232_800},
    metric=pb.TOP_MEDIA_METRIC_STARTS,
)
ALPHABET = string.ascii_letters + string.digits + "-_."


def parse(
    token: str, secret: bytes | None = None, **changes: Unpack[TopFields]
) -> tuple[request_parsing.TopQuery | None, set[tuple[str, str]]]:
    fields: TopFields = {**FIELDS, **changes}
    request = pb.ListTopMediaRequest(**fields, page_token=token)
    query, violations = (
        request_parsing.parse_top(request, LIMITS, secret)
        if secret
        else request_parsing.parse_top(request, LIMITS)
    )
    return query, {(v.field, v.reason) for v in violations}


def issued(offset: int, secret: bytes | None = None) -> str:
    """A token as the service hands it out with its page."""
    first, _ = parse("")
    assert first is not None
    if secret is None:
        return request_parsing.encode_page_token(first.fingerprint, offset)
    return request_parsing.encode_page_token(first.fingerprint, offset, secret)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_a_token_round_trips() -> None:
    for offset in (1, 10, 999, 2**40):
        query, problems = parse(issued(offset))
        assert not problems and query is not None and query.offset == offset
    query, problems = parse(issued(30, b"k1"), b"k1")
    assert not problems and query is not None and query.offset == 30


def test_a_token_forged_from_the_request_fields_is_refused() -> None:
    # The fingerprint was an unkeyed hash of the request fields: anyone could compute it.
    parts = (FIELDS["start_time"]["seconds"], 0, FIELDS["end_time"]["seconds"], 0, FIELDS["metric"])
    fingerprint = hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
    for version in (1, 2):
        document = {"v": version, "f": fingerprint, "o": 12_345}
        forged = b64(json.dumps(document, separators=(",", ":")).encode())
        assert parse(forged)[1] == {("page_token", "INVALID_PAGE_TOKEN")}
        assert parse(forged + "." + b64(bytes(16)))[1] == {("page_token", "INVALID_PAGE_TOKEN")}


def test_flipping_any_character_is_refused() -> None:
    token = issued(40)
    for i, original in enumerate(token):
        for replacement in ALPHABET:
            if replacement != original:
                altered = token[:i] + replacement + token[i + 1 :]
                query, problems = parse(altered)
                assert query is None and problems == {("page_token", "INVALID_PAGE_TOKEN")}, (
                    i,
                    replacement,
                )


def test_changing_the_offset_inside_is_refused() -> None:
    token = issued(40)
    body, _, mac = token.partition(".")
    document = json.loads(unb64(body)) if mac else None
    assert isinstance(document, dict) and document["o"] == 40  # the offset is readable ...
    for offset in (0, 41, 4000):
        moved = b64(json.dumps({**document, "o": offset}, separators=(",", ":")).encode())
        assert parse(moved + "." + mac)[1] == {
            ("page_token", "INVALID_PAGE_TOKEN")
        }  # ... not writable


def test_a_token_signed_with_another_secret_is_refused() -> None:
    assert parse(issued(40, b"one deployment"), b"another")[1] == {
        ("page_token", "INVALID_PAGE_TOKEN")
    }
    assert parse(issued(40, b"one deployment"))[1] == {("page_token", "INVALID_PAGE_TOKEN")}
    assert parse(issued(40), b"one deployment")[1] == {("page_token", "INVALID_PAGE_TOKEN")}


def test_a_token_of_another_request_is_refused() -> None:
    token = issued(40)
    for change in (
        TopFields(metric=pb.TOP_MEDIA_METRIC_VIEW_TIME),
        TopFields(end_time={"seconds": FIELDS["end_time"]["seconds"] + 1}),
        TopFields(start_time={"seconds": FIELDS["start_time"]["seconds"], "nanos": 1}),
    ):
        query, problems = parse(token, **change)
        assert query is None and problems == {("page_token", "PAGE_TOKEN_MISMATCH")}, change
    query, problems = parse(token, limit=3)  # AIP-158: the page size may change
    assert query is not None and query.offset == 40 and not problems
