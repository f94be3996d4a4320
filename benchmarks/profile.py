"""`make profile`: where a service spends its time under one benchmark section.

    python -m benchmarks.profile --only stats [--top 15] [--rate 100] [bench flags ...]

Runs `python -m benchmarks --only SECTION ...` (extra flags are passed on), finds the service
process the bench starts (`python -m ingest_service|stats_service|recommender_service`, a
descendant of the bench), attaches `py-spy record --format raw` to it, and stops sampling when
the service logs that it caught up (consumers; so query load is not mixed into the consume
profile) or when it exits (ingest). Then prints the top frames by own time (the innermost
frame of each sample, line numbers folded per function) and by inclusive time. The raw stacks
stay under .data/profile/ for `flamegraph.pl` or speedscope.

py-spy samples from outside the process (ptrace): it needs root or CAP_SYS_PTRACE.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / ".data" / "profile"
SERVICES = {
    "ingest": "ingest_service",
    "stats": "stats_service",
    "recommender": "recommender_service",
}
# The consumer's own line (viewevents.consumer), not e.g. a query refused as "not caught up".
CAUGHT_UP = re.compile(rb"\]: caught up on partitions")
_LINE = re.compile(r" \(([^():]+):\d+\)$")  # "func (path.py:123)" -> fold the line number


def parse_raw(lines: Iterable[str]) -> tuple[Counter[str], Counter[str], int]:
    """Own-time and inclusive-time sample counts per frame from py-spy's raw (collapsed) output:
    one `frame;frame;...;innermost COUNT` line per distinct stack."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = [_fold(frame) for frame in stack.split(";") if frame]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return own, inclusive, total


def _fold(frame: str) -> str:
    """`func (/abs/path/to/mod.py:12)` -> `func (to/mod.py)`: one row per function."""
    frame = frame.strip()
    found = _LINE.search(frame)
    if not found:
        return frame
    path = found.group(1)
    short = "/".join(path.split("/")[-2:])
    return f"{frame[: found.start()]} ({short})"


def format_top(own: Counter[str], inclusive: Counter[str], total: int, top: int) -> str:
    rows = [f"{total} samples", f"top {top} frames by own time:"]
    rows += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    rows.append(f"top {top} frames by inclusive time:")
    rows += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(rows)


def _find_service(bench: psutil.Popen, module: str, timeout: float) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if bench.poll() is not None:
            raise RuntimeError("the bench ended before its service started")
        for child in bench.children(recursive=True):
            try:
                command = child.cmdline()
            except psutil.Error:
                continue
            if "-m" in command and module in command:
                return child
        time.sleep(0.05)
    raise TimeoutError(f"no {module} process within {timeout:.0f} s")


def _log_of(process: psutil.Process) -> Path | None:
    """The file the service's stdout goes to (the benches redirect it to their log)."""
    try:
        target = os.readlink(f"/proc/{process.pid}/fd/1")
    except OSError:
        return None
    return Path(target) if target.startswith("/") and Path(target).is_file() else None


def profile(section: str, bench_args: list[str], rate: int, top: int) -> str:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    OUT.mkdir(parents=True, exist_ok=True)
    raw = OUT / f"{section}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    bench = psutil.Popen(
        [sys.executable, "-m", "benchmarks", "--only", section, *bench_args], cwd=REPO
    )
    service = _find_service(bench, SERVICES[section], timeout=3600)
    log = _log_of(service)
    start = log.stat().st_size if log is not None else 0
    spy = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(service.pid),
            "--format",
            "raw",
            "--rate",
            str(rate),
            "--output",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    while spy.poll() is None:
        if section != "ingest" and log is not None:
            with open(log, "rb") as text:
                text.seek(start)
                if CAUGHT_UP.search(text.read()):
                    spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
                    break
        time.sleep(0.2)
    spy.wait()
    bench.wait()
    if not raw.exists():
        raise RuntimeError(
            f"py-spy wrote nothing: {spy.stderr.read().decode() if spy.stderr else ''}"
        )
    own, inclusive, total = parse_raw(raw.read_text().splitlines())
    return f"\n== profile of {SERVICES[section]} ({raw}) ==\n" + format_top(
        own, inclusive, total, top
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--only",
        choices=sorted(SERVICES),
        action="append",
        help="section(s) to profile, one after the other (default: all)",
    )
    parser.add_argument("--rate", type=int, default=100, help="samples per second")
    parser.add_argument("--top", type=int, default=10)
    args, bench_args = parser.parse_known_args(argv)
    reports = [
        profile(section, bench_args, args.rate, args.top)
        for section in args.only or ["ingest", "stats", "recommender"]
    ]
    print("\n".join(reports))


if __name__ == "__main__":
    main()
