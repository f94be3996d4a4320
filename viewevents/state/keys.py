"""The framework's part of the RocksDB key layout, shared by every service's store.

Every key starts with the Kafka partition it came from (2 bytes, big-endian), then a one-byte
kind, then the kind's own key. A partition's state is thus one contiguous key range, which is
what lets partitions move between instances. The framework owns these kinds; services use other
letters (each service's `key_layout` module lists its own and checks them against `RESERVED`):

  o + topic                 -> next offset to read (BIG_I64)          consumer position
  w                         -> highest event time applied (BIG_I64, Unix seconds)
  i + event_id              -> first-seen day (BIG_U32)                de-duplication
  j                         -> oldest first-seen day stored (BIG_U32), gates the sweep
"""

from __future__ import annotations

from viewevents.state.codecs import BIG_U16

KIND_OFFSET = b"o"
KIND_WATERMARK = b"w"
KIND_SEEN = b"i"
KIND_SEEN_OLDEST = b"j"
RESERVED = frozenset({KIND_OFFSET, KIND_WATERMARK, KIND_SEEN, KIND_SEEN_OLDEST})


def partition_prefix(partition: int) -> bytes:
    return BIG_U16.pack(partition)


def offset_key(partition: int, topic: str) -> bytes:
    return partition_prefix(partition) + KIND_OFFSET + topic.encode()


def watermark_key(partition: int) -> bytes:
    return partition_prefix(partition) + KIND_WATERMARK


def seen_prefix(partition: int) -> bytes:
    return partition_prefix(partition) + KIND_SEEN


def seen_key(partition: int, event_id: str) -> bytes:
    return seen_prefix(partition) + event_id.encode()


def seen_oldest_key(partition: int) -> bytes:
    return partition_prefix(partition) + KIND_SEEN_OLDEST


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with `prefix`."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        raise ValueError("prefix of only 0xff bytes has no end")
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def check_service_kinds(kinds: set[bytes] | frozenset[bytes]) -> None:
    """Raise if a service's kinds clash with the framework's or are not one byte each."""
    clash = set(kinds) & RESERVED
    if clash:
        raise ValueError(f"key kinds {sorted(clash)} belong to the framework")
    if any(len(kind) != 1 for kind in kinds):
        raise ValueError("key kinds are one byte each")
