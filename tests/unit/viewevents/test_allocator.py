"""glibc malloc accounting (viewevents/allocator.heap_usage) against allocations made here."""

from __future__ import annotations

import ctypes

import pytest

from viewevents.allocator import HeapUsage, heap_usage

MiB = 1024 * 1024
# Other threads of the test process (left by earlier tests) allocate and free meanwhile: the
# totals move by a little besides what a test does (960 bytes short once, in CI).
SLACK = MiB // 2


@pytest.fixture
def libc() -> ctypes.CDLL:
    if heap_usage() is None:
        pytest.skip("no glibc mallinfo2")
    lib = ctypes.CDLL(None)
    lib.malloc.argtypes = [ctypes.c_size_t]
    lib.malloc.restype = ctypes.c_void_p
    lib.free.argtypes = [ctypes.c_void_p]
    lib.free.restype = None
    return lib


def test_small_chunks_count_as_in_use_until_freed(libc: ctypes.CDLL) -> None:
    before = heap_usage()
    chunks = [libc.malloc(1024) for _ in range(8192)]  # 8 MiB in 1 KiB chunks: arena memory
    fence = libc.malloc(1024)  # kept: the freed chunks are not the heap's top, never trimmed
    during = heap_usage()
    for chunk in chunks:
        libc.free(chunk)
    after = heap_usage()
    libc.free(fence)
    assert before is not None and during is not None and after is not None
    assert during.in_use - before.in_use >= 8 * MiB - SLACK
    assert during.in_use - after.in_use >= 8 * MiB - SLACK
    assert after.free >= 8 * MiB - SLACK  # freed, still held by the arena until trimmed


def test_a_large_chunk_counts_as_live_until_freed(libc: ctypes.CDLL) -> None:
    """Usually mmapped on its own, but an arena with a big enough free chunk (an earlier test's
    large free) serves it instead: either way in_use + mmapped must carry it."""

    def live(usage: HeapUsage | None) -> int:
        assert usage is not None
        return usage.in_use + usage.mmapped

    before = heap_usage()
    chunk = libc.malloc(64 * MiB)
    during = heap_usage()
    libc.free(chunk)
    after = heap_usage()
    assert live(during) - live(before) >= 64 * MiB - SLACK
    assert live(during) - live(after) >= 64 * MiB - SLACK
