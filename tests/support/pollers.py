"""Queries asked again and again while a group scales or loses a member, every outcome kept, and
the checks every outcome must pass: complete (the position lists every partition) and sound, or
UNAVAILABLE with google.rpc.RetryInfo; never a silently partial answer."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from tests.support.configs import port_open
from tests.support.waits import wait_for
from viewevents.rpc.errors import retry_delay_of
from viewevents.v1 import view_event_pb2 as ve

# ask(channel, key) -> (position, value): one query for `key` and what the test keeps of it.
Ask = Callable[[grpc.Channel, Any], tuple[ve.ConsumerPosition, Any]]


@dataclass(frozen=True)
class Answer:
    key: Any
    offsets: dict[int, int]
    value: Any


class Poller(threading.Thread):
    """Asks one instance about `keys` in turn until stopped; keeps answers and errors.
    `tolerated` codes (e.g. NOT_FOUND before an item's first event applied) are counted apart."""

    def __init__(
        self,
        address: str,
        keys: Sequence[Any],
        ask: Ask,
        tolerated: Iterable[grpc.StatusCode] = (),
    ) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.keys = list(keys)
        self.ask = ask
        self.tolerated = frozenset(tolerated)
        self.answers: list[Answer] = []
        self.unavailable: list[tuple[str, float | None]] = []
        self.tolerated_errors = 0
        self.other_errors: list[str] = []
        self.done = threading.Event()

    @classmethod
    def when_listening(
        cls,
        address: str,
        keys: Sequence[Any],
        ask: Ask,
        tolerated: Iterable[grpc.StatusCode] = (),
        timeout: float = 120.0,
    ) -> Poller:
        """Started once the instance's gRPC port accepts connections (before that, a refused
        connection says nothing about the service's answers)."""
        host, port = address.rsplit(":", 1)
        wait_for(lambda: port_open(int(port), host), timeout, message=f"{address} not listening")
        poller = cls(address, keys, ask, tolerated)
        poller.start()
        return poller

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            while not self.done.is_set():
                for key in self.keys:
                    try:
                        position, value = self.ask(channel, key)
                    except grpc.RpcError as error:
                        if error.code() == grpc.StatusCode.UNAVAILABLE:
                            self.unavailable.append((error.details() or "", retry_delay_of(error)))
                        elif error.code() in self.tolerated:
                            self.tolerated_errors += 1
                        else:
                            self.other_errors.append(f"{error.code()}: {error.details()}")
                        continue
                    offsets = {p.partition: p.offset for p in position.partitions}
                    self.answers.append(Answer(key, offsets, value))
                self.done.wait(0.05)

    def stop(self) -> None:
        self.done.set()
        self.join(60)


def stop_once_answered(pollers: Sequence[Poller], timeout: float = 120.0) -> None:
    """Stop the pollers once each has had a complete answer: an instance that has just caught
    up may not have been asked again yet (its poller was between rounds)."""
    wait_for(
        lambda: all(p.answers for p in pollers),
        timeout,
        message=f"never answered: {[p.address for p in pollers if not p.answers]}",
    )
    for poller in pollers:
        poller.stop()


def check_never_partial(pollers: Sequence[Poller], partitions: int) -> None:
    """Every answer lists every partition; every UNAVAILABLE carries a positive RetryInfo; no
    other error; each poller got answers; per poller and key, no partition's offset goes back."""
    for poller in pollers:
        assert not poller.other_errors, (poller.address, poller.other_errors[:3])
        assert poller.answers, f"{poller.address} never answered"
        partial = [a for a in poller.answers if set(a.offsets) != set(range(partitions))]
        assert not partial, f"{poller.address}: answers not covering every partition: {partial[:3]}"
        no_retry = [u for u in poller.unavailable if u[1] is None or u[1] <= 0]
        assert not no_retry, f"{poller.address}: UNAVAILABLE without RetryInfo: {no_retry[:3]}"
        last: dict[Any, dict[int, int]] = defaultdict(dict)
        for answer in poller.answers:
            before = last[answer.key]
            back = {p: (before[p], o) for p, o in answer.offsets.items() if o < before.get(p, 0)}
            assert not back, f"{poller.address}: key {answer.key} went back {back}"
            last[answer.key] = answer.offsets


def summary(pollers: Sequence[Poller]) -> str:
    """Answers and UNAVAILABLE counts per instance, for the test's output."""
    return ", ".join(
        f"{p.address}: {len(p.answers)} answers, {len(p.unavailable)} UNAVAILABLE" for p in pollers
    )
