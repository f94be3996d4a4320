"""What every benchmark measures the same way: peak resident memory of a process, free ports."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PeakRss:
    """A process's peak resident memory: the kernel's VmHWM while the process lives, backed by
    sampling in a thread (so the figure survives the process's exit)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.process = psutil.Process(pid)
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            try:
                self.peak_bytes = max(
                    self.peak_bytes, self._kernel_peak() or self.process.memory_info().rss
                )
            except (psutil.Error, OSError):
                return
            time.sleep(interval)

    def _kernel_peak(self) -> int:
        found = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{self.pid}/status").read_text())
        return int(found.group(1)) * 1024 if found else 0

    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    def stop(self) -> float:
        """Stop sampling; the peak in MiB."""
        self._stop.set()
        self._thread.join()
        return self.peak_mb()
