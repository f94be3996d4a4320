"""What every benchmark measures the same way: peak resident memory of a process, free ports,
CPU seconds of a process, latency with the ghz load generator."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

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


GHZ = Path(__file__).resolve().parent.parent / ".cache" / "go" / "bin" / "ghz"
PROTOS = Path(__file__).resolve().parent.parent / "protos"


def mib_and_mb(mib: float) -> str:
    """A size in MiB (what the services budget in) beside its MB (what the issues' bars use:
    200 MB is 190.7 MiB)."""
    return f"{mib:.1f} MiB = {mib * 2**20 / 1e6:.1f} MB"


def log_match(log_path: Path, pattern: str) -> re.Match[str] | None:
    """The last match of `pattern` in a service's log file (None: not there yet)."""
    found = list(re.finditer(pattern, log_path.read_text(errors="replace")))
    return found[-1] if found else None


async def wait_log(
    log_path: Path,
    pattern: str,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
) -> re.Match[str] | None:
    """`log_match` once the log has it; None after `timeout` s or once `process` exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (process is None or process.poll() is None):
        found = log_match(log_path, pattern)
        if found:
            return found
        await asyncio.sleep(0.1)
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    return float(sum(psutil.Process(pid).cpu_times()[:2]))


def ghz_latency(
    address: str,
    method: str,
    proto: str,
    requests: list[dict[str, Any]],
    concurrency: int,
    service_pid: int,
) -> dict[str, Any]:
    """p50/p99 (ms), calls/s and the service's CPU per call of `requests` (protobuf JSON, sent
    in turn) made by ghz (a Go load generator: its client costs little CPU next to Python
    clients on a shared machine). The protos are given as files, so a bare server without
    reflection (benchmarks/grpc_floor.py) is measured the same way. Empty when ghz is not
    installed."""
    if not GHZ.exists():
        return {"skipped": f"no {GHZ} (make tools)"}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as data:
        json.dump(requests, data)
        data.flush()
        before = cpu_seconds(service_pid)
        done = subprocess.run(
            [
                str(GHZ),
                "--insecure",
                "--import-paths",
                str(PROTOS),
                "--proto",
                str(PROTOS / proto),
                "--call",
                method,
                "-c",
                str(concurrency),
                "-n",
                str(len(requests)),
                "-D",
                data.name,
                "--cpus",
                "1",
                "--format",
                "json",
                address,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        used = cpu_seconds(service_pid) - before
    if done.returncode != 0 or not done.stdout.strip():
        return {"failed": (done.stderr or done.stdout).strip()[:200]}
    report = json.loads(done.stdout)
    at = {d["percentage"]: d["latency"] / 1e6 for d in report.get("latencyDistribution") or []}
    errors = sum(v for k, v in (report.get("statusCodeDistribution") or {}).items() if k != "OK")
    return {
        "p50_ms": round(at.get(50, float("nan")), 2),
        "p99_ms": round(at.get(99, float("nan")), 2),
        "calls_per_s": round(report.get("rps", 0)),
        "errors": errors,
        "service_cpu_ms_per_call": round(1000 * used / max(1, len(requests)), 3),
    }
