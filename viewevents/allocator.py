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
