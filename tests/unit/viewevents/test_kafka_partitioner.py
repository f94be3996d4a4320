"""The ingest service's partitioner must put a key where Kafka's Java client would, so records
of one user land in the partition every Kafka tool expects. Checked against vectors from Java."""

from __future__ import annotations

import pytest

from viewevents.kafka import KeyPartitioner, user_key

# Produced with Java 17 and kafka-clients-4.1.1.jar (.cache/kafka/libs) by a small program that
# prints, for each key, org.apache.kafka.common.utils.Utils.murmur2(key) and
# Utils.toPositive(murmur2(key)) % 4 and % 8:
#   javac -cp '.cache/kafka/libs/*' Vectors.java && java -cp '.cache/kafka/libs/*:.' Vectors
# (key as hex, signed 32-bit murmur2, partition of 4, partition of 8)
JAVA_VECTORS: list[tuple[bytes, int, int, int]] = [
    (b"", 275646681, 1, 1),
    (b"1", -1993445489, 3, 7),
    (b"42", 417700972, 0, 4),
    (b"123456789", -1822237082, 2, 6),
    (b"7", -1961297549, 3, 3),
    (b"1000000", -1399446429, 3, 3),
    (b"user-12345", -243491053, 3, 3),
    (bytes.fromhex("c3a9"), 186971271, 3, 7),  # "é" in UTF-8
    (bytes.fromhex("e29883"), 36233967, 3, 7),  # "☃" in UTF-8
    (bytes.fromhex("ff00807f01"), -315781896, 0, 0),  # bytes with the sign bit set, and zero
    (bytes.fromhex("f09f8eac21fe"), -1275133426, 2, 6),  # 6 bytes: a 2-byte tail
]


@pytest.mark.parametrize(
    ("key", "java_hash", "of_4", "of_8"),
    JAVA_VECTORS,
    ids=[k.hex() or "empty" for k, *_ in JAVA_VECTORS],
)
def test_partition_equals_javas_default_partitioner(
    key: bytes, java_hash: int, of_4: int, of_8: int
) -> None:
    assert KeyPartitioner(4)(key) == of_4
    assert KeyPartitioner(8)(key) == of_8
    # Java's toPositive(h) is h & 0x7fffffff: the partitions follow from the hash itself.
    assert ((java_hash & 0x7FFFFFFF) % 4, (java_hash & 0x7FFFFFFF) % 8) == (of_4, of_8)


def test_memo_gives_the_same_answers_after_it_is_cleared() -> None:
    """The bounded memo is only a cache: answers do not change when it fills up and resets."""
    partitioner = KeyPartitioner(8, memo_size=2)
    for _ in range(3):
        assert [partitioner(k) for k, *_ in JAVA_VECTORS] == [p for *_, p in JAVA_VECTORS]
    assert len(partitioner._memo) <= 2


def test_user_key_is_ascii_decimal() -> None:
    assert user_key(42) == b"42" and user_key(123456789) == b"123456789"
