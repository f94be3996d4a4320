"""Per-instance RocksDB directories inside one directory that several instances share.

docker compose mounts one named volume into every replica of a service (`--scale` cannot give
each replica a volume of its own), but two processes must never open one RocksDB. So, when the
state directory is shared, each instance keeps its store in a subdirectory `slot-N` and holds an
exclusive lock on `slot-N.lock` for its whole life: it takes the lowest N that no running
instance holds. The lock is the kernel's (flock), so it is released when the process dies, however
it dies, and a replica that is recreated (or a new one after a removal) takes over a store that a
stopped one left: the group's assignor then gives it back the partitions that store is furthest
along in, and anything else is replayed from the topic.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

SLOT_PREFIX = "slot-"


@dataclass
class Slot:
    """A claimed subdirectory; the lock lasts until `release` or the end of the process."""

    path: Path
    lock_fd: int

    def release(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # closing the descriptor drops the flock
            self.lock_fd = -1


def claim_slot(parent: str | Path, limit: int = 1024) -> Slot:
    """Lock and return the lowest free `slot-N` under `parent` (created when missing)."""
    root = Path(parent)
    root.mkdir(parents=True, exist_ok=True)
    for index in range(limit):
        lock_path = root / f"{SLOT_PREFIX}{index}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        path = root / f"{SLOT_PREFIX}{index}"
        path.mkdir(exist_ok=True)
        return Slot(path, fd)
    raise RuntimeError(f"all {limit} state slots under {root} are held by running instances")
