"""`make run`: the three services in the foreground against the local broker; Ctrl-C stops all.

Each service is its own process (as in production), configured by the same environment
variables and flags documented in viewevents/config.py.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from viewevents import config as settings

REPO = Path(__file__).resolve().parent.parent

SERVICES = (
    ("ingest_service", "ingest_address", "viewevents.v1.IngestService"),
    ("stats_service", "stats_address", "viewevents.v1.StatsService"),
    ("recommender_service", "recommender_address", "viewevents.v1.RecommenderService"),
)


def _status(address: str) -> str:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError:
        return "NOT_LISTENING"


def main() -> None:
    config = settings.load()
    processes: list[tuple[str, str, subprocess.Popen]] = []
    for module, address_setting, _ in SERVICES:
        if importlib.util.find_spec(f"{module}.__main__") is None:
            print(f"{module}: not built yet, skipped")
            continue
        # Own session: Ctrl-C reaches only this runner, which then stops each service once.
        process = subprocess.Popen([sys.executable, "-m", module], cwd=REPO, start_new_session=True)
        processes.append((module, getattr(config, address_setting), process))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all(_status(address) != "NOT_LISTENING" for _, address, _ in processes):
            break
        if any(p.poll() is not None for _, _, p in processes):
            break
        time.sleep(0.3)
    print(f"\nview-event services (Kafka at {config.kafka_bootstrap}):")
    for module, address, process in processes:
        state = "exited" if process.poll() is not None else _status(address)
        print(f"  {module:<22} {address:<18} {state}")
    print(f"\nTry:  grpcurl -plaintext {config.ingest_address} list")
    print("      viewevents gen /tmp/events.jsonl --events 100000 && viewevents upload /tmp/events.jsonl")
    print("Ctrl-C stops everything.\n")
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    waiting = {module: address for module, address, _ in processes if _status(address) != "SERVING"}
    last_check = time.monotonic()
    while not stopping and all(p.poll() is None for _, _, p in processes):
        time.sleep(0.5)
        if waiting and time.monotonic() - last_check > 2:
            last_check = time.monotonic()
            for module, address in list(waiting.items()):
                if _status(address) == "SERVING":
                    print(f"{module} is SERVING (caught up with Kafka)", flush=True)
                    del waiting[module]
    for _, _, process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for module, _, process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        print(f"{module} stopped (exit {process.returncode})")


if __name__ == "__main__":
    main()
