"""`make run`: the three services in the foreground against the local broker; Ctrl-C stops all.

Each service is its own process (as in production), configured by the same environment
variables and flags (the table: viewevents_tools/settings_catalogue.py).

The runner can never orphan a service: its SIGINT/SIGTERM handler is installed before any
child exists, every child is started with PR_SET_PDEATHSIG (the kernel sends it SIGTERM when the
runner dies, even by kill -9), and with `--start-kafka` it stops only a broker it started itself.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import threading
import time
from urllib.parse import urlsplit

from viewevents_tools import settings_catalogue as settings
from viewevents_tools.processes import REPO, health_status, spawn_service

KAFKA_SCRIPT = REPO / "deploy" / "kafka.sh"
STOP_GRACE_SECONDS = 20.0

SERVICES = (
    ("ingest_service", "ingest_address"),
    ("stats_service", "stats_address"),
    ("recommender_service", "recommender_address"),
)


def _kafka_port(bootstrap: str) -> str:
    first = bootstrap.split(",")[0]
    return str(urlsplit(f"//{first}").port or 9092)


class DevStack:
    """The children and the stop flag; `stop_requested` is set from the signal handler."""

    def __init__(self, config: settings.Config) -> None:
        self.config = config
        self.stop_requested = threading.Event()
        self.children: list[tuple[str, str, subprocess.Popen[bytes]]] = []
        self.started_kafka = False

    def request_stop(self, *_: object) -> None:
        self.stop_requested.set()

    def start_kafka(self) -> None:
        env = dict(os.environ, KAFKA_PORT=_kafka_port(self.config.kafka_bootstrap))
        if subprocess.run([str(KAFKA_SCRIPT), "status"], env=env).returncode == 0:
            print(
                f"reusing the broker already answering at {self.config.kafka_bootstrap}; "
                "it is left running on exit",
                flush=True,
            )
            return
        self.started_kafka = True  # set first: a Ctrl-C mid-start still stops what started
        subprocess.run([str(KAFKA_SCRIPT), "start"], env=env, check=True)

    def stop_kafka(self) -> None:
        if self.started_kafka:
            env = dict(os.environ, KAFKA_PORT=_kafka_port(self.config.kafka_bootstrap))
            subprocess.run([str(KAFKA_SCRIPT), "stop"], env=env, check=False)

    def spawn(self) -> None:
        for module, address_setting in SERVICES:
            if self.stop_requested.is_set():
                return
            process = spawn_service(module)
            self.children.append((module, getattr(self.config, address_setting), process))

    def any_exited(self) -> bool:
        return any(p.poll() is not None for _, _, p in self.children)

    def wait_listening(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop_requested.is_set():
            if all(health_status(a) != "NOT_LISTENING" for _, a, _ in self.children):
                return
            if self.any_exited():
                return
            self.stop_requested.wait(0.3)

    def print_table(self) -> None:
        print(f"\nview-event services (Kafka at {self.config.kafka_bootstrap}):")
        for module, address, process in self.children:
            state = "exited" if process.poll() is not None else health_status(address)
            print(f"  {module:<22} {address:<18} {state}")
        print(f"\nTry:  grpcurl -plaintext {self.config.ingest_address} list")
        print(
            "      viewevents gen /tmp/events.jsonl --events 100000 && "
            "viewevents upload /tmp/events.jsonl"
        )
        print("Ctrl-C stops everything.\n", flush=True)

    def watch(self) -> None:
        """Until Ctrl-C or a child exits; says when each consumer becomes SERVING."""
        waiting = {m: a for m, a, _ in self.children if health_status(a) != "SERVING"}
        while not self.stop_requested.is_set() and not self.any_exited():
            self.stop_requested.wait(2.0 if waiting else 0.5)
            for module, address in list(waiting.items()):
                if health_status(address) == "SERVING":
                    print(f"{module} is SERVING (caught up with Kafka)", flush=True)
                    del waiting[module]

    def stop_children(self) -> None:
        for _, _, process in self.children:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for module, _, process in self.children:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            print(f"{module} stopped (exit {process.returncode})", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m viewevents_tools.dev_stack", description=__doc__
    )
    parser.add_argument(
        "--start-kafka",
        action="store_true",
        help="start the local broker (deploy/kafka.sh) unless one answers; "
        "stop it on exit only if this run started it",
    )
    args = parser.parse_args(argv)
    stack = DevStack(settings.load())
    # Before anything starts: a Ctrl-C at any moment from here on stops what was started.
    signal.signal(signal.SIGINT, stack.request_stop)
    signal.signal(signal.SIGTERM, stack.request_stop)
    try:
        if args.start_kafka:
            stack.start_kafka()
        if not stack.stop_requested.is_set():
            stack.spawn()
            stack.wait_listening()
        if not stack.stop_requested.is_set():
            stack.print_table()
            stack.watch()
    finally:
        stack.stop_children()
        stack.stop_kafka()


if __name__ == "__main__":
    main()
