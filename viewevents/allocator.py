"""glibc malloc tuning for the consuming services, applied once at start-up (before threads).

Measured in the soak (drills/soak.py): the stats service's RSS grew from ~200 to ~370 MiB
while RocksDB's own accounting stayed at ~50 MiB; /proc/<pid>/smaps showed the growth in
four 64 MiB per-thread malloc arenas (gRPC handler threads, asyncio's worker threads, the
consumer thread each get one) holding ~40 MiB each. Two knobs bound that:

- M_ARENA_MAX: at most this many arenas, so freed memory of one thread is reused by the next
  instead of sitting in an arena no running thread uses.
- M_MMAP_THRESHOLD: a fixed threshold (setting it also turns off glibc's dynamic threshold,
  which rises to 32 MiB after the first large free) so that large numpy temporaries and
  RocksDB scan results are mmapped and returned to the kernel on free rather than fragmenting
  an arena.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
M_ARENA_MAX = -8


def malloc_options(arena_max: int, mmap_threshold_kb: int) -> list[tuple[int, int]]:
    """The (parameter, value) pairs to pass to mallopt; 0 leaves a knob at glibc's default."""
    options: list[tuple[int, int]] = []
    if arena_max > 0:
        options.append((M_ARENA_MAX, arena_max))
    if mmap_threshold_kb > 0:
        options.append((M_MMAP_THRESHOLD, mmap_threshold_kb * 1024))
    return options


def configure_malloc(arena_max: int, mmap_threshold_kb: int) -> bool:
    """Apply `malloc_options`; False where libc has no mallopt (e.g. musl) or refused one."""
    options = malloc_options(arena_max, mmap_threshold_kb)
    if not options:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.info("no glibc mallopt: allocator left at its defaults")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = all(mallopt(param, value) == 1 for param, value in options)
    log.info(
        "malloc: at most %s arenas, mmap threshold %s KiB%s",
        arena_max or "default",
        mmap_threshold_kb or "dynamic",
        "" if applied else " (mallopt refused a value)",
    )
    return applied


class _Mallinfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (malloc.h, glibc 2.33+): every field a size_t."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@dataclass(frozen=True)
class HeapUsage:
    """What glibc malloc holds, over all arenas: tells a growing RSS that is live native memory
    (in_use, mmapped) from memory freed but kept by the allocator (free)."""

    in_use: int  # bytes of chunks handed out from the arenas (uordblks)
    mmapped: int  # bytes of chunks mmapped on their own, above the mmap threshold (hblkhd)
    free: int  # bytes free inside the arenas, not returned to the kernel (fordblks)


def heap_usage() -> HeapUsage | None:
    """glibc's mallinfo2 now; None where libc has none (musl, glibc before 2.33). Walks every
    arena under its lock: cheap enough once a minute, not per request."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.argtypes = []
    mallinfo2.restype = _Mallinfo2
    info = mallinfo2()
    return HeapUsage(in_use=info.uordblks, mmapped=info.hblkhd, free=info.fordblks)
