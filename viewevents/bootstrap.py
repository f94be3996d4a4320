"""How every service process starts and stops, in one place.

`main` turns flags and environment into a `Config`, sets up logging and runs the service's
`serve`. `serve` builds the gRPC server the same way for every service (limits, request ids and
latency metrics, optional bearer token, lenient request parsing, reflection, grpc.health.v1, TLS),
exposes metrics, and on SIGTERM/SIGINT stops taking RPCs, lets in-flight ones finish and then
runs the service's own shutdown. `serve_consumer` adds the consumer lifecycle of the services that
fold the view topic into RocksDB: health follows the consumer's readiness, both ways (NOT_SERVING
while catching up after start or a rebalance, or while Kafka is unreachable).

Shutdown is bounded whatever Kafka does: RPCs get `RPC_GRACE_S`, each Kafka step (the consumer
loop's exit with its group commit, leaving the group, flushing the producer) at most
`KAFKA_STEP_S`, and a process still alive `EXIT_WITHIN_S` after the signal exits anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import sys
import tracemalloc
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from google.protobuf.descriptor import ServiceDescriptor

from viewevents import config as settings
from viewevents import scatter
from viewevents.allocator import configure_malloc, heap_usage
from viewevents.config import Config, Setting
from viewevents.consumer import ExactlyOnceConsumer, Processor
from viewevents.kafka import ensure_topics
from viewevents.logs import setup_logging
from viewevents.memory import MemoryPlan, plan_memory
from viewevents.metrics import CONSUMER_LAG, ROCKSDB_BYTES, serve_metrics
from viewevents.readiness import Readiness, until_kafka_answers
from viewevents.rpc.server import (
    add_service,
    bind,
    enable_reflection_and_health,
    exit_after,
    new_server,
    serve_until_stopped,
    set_serving,
)
from viewevents.state.slots import claim_slot
from viewevents.state.store import StateStore

log = logging.getLogger(__name__)

RPC_GRACE_S = 5.0  # in-flight RPCs may finish for this long after SIGTERM/SIGINT
KAFKA_STEP_S = 3.0  # each Kafka step of shutdown is cut off after this
EXIT_WITHIN_S = 14.0  # last resort: the process exits this long after the signal


@dataclass(frozen=True)
class Endpoint:
    """What a service exposes: its proto service at an address, and its metrics port."""

    name: str  # short name for logs and metric labels ("ingest")
    descriptor: ServiceDescriptor
    address: str
    metrics_port: int = 0
    token: str = ""  # when set, the service's methods need 'authorization: Bearer <token>'
    max_request_bytes: int = 8 * 1024 * 1024
    # Where other instances reach this one (consuming services: sent to the group with every
    # join); empty: the bind address (see viewevents.membership.advertised_address).
    advertised_address: str = ""
    # Further proto services the same servicer implements (e.g. an internal service between
    # instances): registered, listed by reflection and behind the same token as `descriptor`.
    extra: tuple[ServiceDescriptor, ...] = ()


@runtime_checkable
class Closeable(Protocol):
    """A servicer with resources of its own (threads, caches) to release on shutdown."""

    def close(self) -> None: ...


@runtime_checkable
class ReportsMemory(Protocol):
    """A servicer whose own caches' bytes go into the once-a-minute memory line."""

    def memory_bytes(self) -> dict[str, int]: ...


def main(
    prog: str,
    description: str | None,
    service_settings: Sequence[Setting],
    serve_service: Callable[[Config], Coroutine[Any, Any, None]],
    argv: Sequence[str] | None = None,
) -> None:
    """The `main()` of every service: flags and environment, logging, then `serve_service`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    settings.add_flags(parser, service_settings)
    config = settings.load(service_settings, parser.parse_args(argv))
    setup_logging(prog.removesuffix("_service"), config.log_level, config.log_json)
    if "malloc_arena_max" in config.as_dict():  # consuming services; before any thread starts
        configure_malloc(config.malloc_arena_max, config.malloc_mmap_threshold_kb)
    try:
        asyncio.run(_stoppable_from_the_start(serve_service(config)))
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        # Shutdown is done (or under way in worker threads that must finish their batch): a
        # second SIGTERM, e.g. from a supervisor after Ctrl-C, must not cut it short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _Signals:
    """SIGTERM/SIGINT of the whole process life: before the gRPC server runs a signal cancels
    the start-up (e.g. a wait for Kafka) and the process exits 0; afterwards it sets `stop`,
    which `serve_until_stopped` awaits for the graceful stop. One object, so that no signal
    falls between two sets of handlers."""

    def __init__(self, starting: asyncio.Task[Any]) -> None:
        self.stop = asyncio.Event()
        self.serving = False
        self.signalled_while_starting = False
        self._starting = starting

    def handle(self) -> None:
        if self.stop.is_set():
            return
        self.stop.set()
        if not self.serving:
            self.signalled_while_starting = True
            log.info("signal during start-up: stopping")
            exit_after(EXIT_WITHIN_S)
            self._starting.cancel()


_SIGNALS: ContextVar[_Signals | None] = ContextVar("viewevents_signals", default=None)


async def _stoppable_from_the_start(serving: Coroutine[Any, Any, None]) -> None:
    """Run `serving` with SIGTERM/SIGINT handled from its first instant (see `_Signals`)."""
    task = asyncio.current_task()
    assert task is not None
    signals = _Signals(task)
    _SIGNALS.set(signals)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signals.handle)
    try:
        await serving
    except asyncio.CancelledError:
        if not signals.signalled_while_starting:
            raise
        log.info("stopped during start-up")


async def serve(
    config: Config,
    endpoint: Endpoint,
    servicer: object,
    *,
    readiness: Readiness | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve `servicer` until SIGTERM/SIGINT. Health is SERVING at once, or follows
    `readiness` both ways; `on_stop` runs after the last RPC finished and must bound its steps."""
    descriptors = [endpoint.descriptor, *endpoint.extra]
    names = [d.full_name for d in descriptors]
    server = new_server(
        endpoint.max_request_bytes,
        service=endpoint.name,
        token=endpoint.token,
        protected_services=names if endpoint.token else (),
    )
    for descriptor in descriptors:
        add_service(server, descriptor, servicer)
    try:
        health = await enable_reflection_and_health(server, names)
        bind(server, endpoint.address, config.tls_cert_file, config.tls_key_file)
        serve_metrics(endpoint.metrics_port, endpoint.name, config.metrics_host)
        await server.start()
    except BaseException:
        # A signal (or a failure) before the server ran: release what the service started.
        await server.stop(0)
        if isinstance(servicer, Closeable):
            servicer.close()
        if on_stop is not None:
            await on_stop()
        raise

    async def follow_readiness() -> None:
        if readiness is None:
            await set_serving(health, names, True)
            log.info("%s SERVING on %s", endpoint.name, endpoint.address)
            return
        log.info("%s listening on %s (NOT_SERVING until ready)", endpoint.name, endpoint.address)
        shown: bool | None = None
        while True:
            change = readiness.next_change()  # before reading: no change slips in between
            ready = readiness.ready
            if ready != shown:
                await set_serving(health, names, ready)
                log.info(
                    "%s %s on %s (%s)",
                    endpoint.name,
                    "SERVING" if ready else "NOT_SERVING",
                    endpoint.address,
                    readiness.reason,
                )
                shown = ready
            await change.wait()

    following = asyncio.create_task(follow_readiness(), name=f"{endpoint.name}-health")

    async def stop() -> None:
        following.cancel()
        if isinstance(servicer, Closeable):
            servicer.close()
        if on_stop is not None:
            await on_stop()

    signals = _SIGNALS.get()
    if signals is not None:
        signals.serving = True  # from now on a signal stops gracefully, see _Signals
    await serve_until_stopped(
        server,
        stop,
        grace_seconds=RPC_GRACE_S,
        exit_within_seconds=EXIT_WITHIN_S,
        stop=signals.stop if signals is not None else None,
    )


async def serve_consumer(
    config: Config,
    endpoint: Endpoint,
    *,
    state_dir: str,
    group_id: str,
    make_processor: Callable[[StateStore], Processor],
    make_servicer: Callable[[StateStore, ExactlyOnceConsumer, Processor], object],
) -> None:
    """Open the RocksDB store, join the consumer group and serve; on stop finish the batch in
    progress, leave the group and close RocksDB."""
    slot = claim_slot(state_dir) if config.state_dir_shared else None
    if slot is not None:
        log.info("state dir %s is shared: this instance holds %s", state_dir, slot.path.name)
        state_dir = str(slot.path)
    topics = [config.view_topic, config.dead_letter_topic]
    await until_kafka_answers("creating topics", lambda: ensure_topics(config, topics))
    plan = memory_plan(config)
    log.info("memory budget %d MiB: %s", config.memory_budget_mb, plan)
    store = StateStore(state_dir, plan.block_cache_mb, plan.write_buffer_mb)
    servicer: object = None
    try:
        processor = make_processor(store)
        consumer = _new_consumer(config, endpoint, group_id, store, processor, plan)
        servicer = make_servicer(store, consumer, processor)
        await until_kafka_answers("joining the consumer group", consumer.start)
    except BaseException:
        # Stopped (or failed) during start-up: nothing consumed yet; RocksDB closes cleanly.
        if isinstance(servicer, Closeable):
            servicer.close()
        store.close()
        raise
    CONSUMER_LAG.labels(endpoint.name).set_function(consumer.lag)
    ROCKSDB_BYTES.labels(endpoint.name).set_function(store.size_bytes)
    consuming = asyncio.create_task(consumer.run(), name=f"{endpoint.name}-consumer")
    consuming.add_done_callback(_stop_process_if_crashed)
    reporting = asyncio.create_task(
        _report_memory(store, plan, servicer if isinstance(servicer, ReportsMemory) else None),
        name="memory-report",
    )
    trimming = asyncio.create_task(_trim_malloc_periodically(), name="malloc-trim")
    log.info(
        "%s consuming %s in group %s; state %s; advertised to the group as %s",
        endpoint.name,
        config.view_topic,
        group_id,
        state_dir,
        consumer.address,
    )

    async def stop_consumer() -> None:
        """Let the loop finish its batch (one RocksDB write batch: all or nothing), within
        KAFKA_STEP_S; past that, cancel it at its next await (a batch being written still
        completes first); then leave the group (bounded) and close RocksDB."""
        reporting.cancel()
        trimming.cancel()
        await consumer.stop()
        try:
            await asyncio.wait_for(asyncio.shield(consuming), KAFKA_STEP_S)
        except TimeoutError:
            log.warning("consumer loop still busy after %.0f s; cancelling it", KAFKA_STEP_S)
            consuming.cancel()
            await asyncio.gather(consuming, return_exceptions=True)
        except Exception:  # noqa: BLE001 - a crashed loop was logged by its done callback
            pass
        finally:
            await consumer.close(KAFKA_STEP_S)
            store.close()
            if slot is not None:
                slot.release()

    await serve(config, endpoint, servicer, readiness=consumer.readiness, on_stop=stop_consumer)


def peers(config: Config) -> scatter.Peers:
    """Channels to the other instances of a service: TLS when this one serves TLS, verifying
    peers against `tls_peer_ca_file` (default: this instance's own certificate file, so one
    shared certificate or a CA appended to it works) and, when set, `tls_peer_server_name`
    instead of the host each peer advertises."""
    if not config.tls_cert_file:
        return scatter.Peers()
    roots = Path(config.tls_peer_ca_file or config.tls_cert_file).read_bytes()
    return scatter.Peers(scatter.tls_peer_channel(roots, config.tls_peer_server_name))


def memory_plan(config: Config) -> MemoryPlan:
    """The split of the service's memory budget (viewevents.memory), from its settings."""
    return plan_memory(
        config.memory_budget_mb,
        cache_mb=config.rocksdb_cache_mb,
        write_buffer_mb=config.rocksdb_write_buffer_mb,
        fetch_mb=config.kafka_fetch_mb,
    )


def _new_consumer(
    config: Config,
    endpoint: Endpoint,
    group_id: str,
    store: StateStore,
    processor: Processor,
    plan: MemoryPlan,
) -> ExactlyOnceConsumer:
    return ExactlyOnceConsumer(
        bootstrap=config.kafka_bootstrap,
        topic=config.view_topic,
        group_id=group_id,
        store=store,
        processor=processor,
        batch_max=config.consume_batch_max,
        batch_min=config.consume_batch_min,
        batch_bytes=config.consume_batch_mb * 1024 * 1024,
        linger_ms=config.consume_linger_ms,
        dedupe_retention_days=config.dedupe_retention_days,
        dedupe_filter_ids=config.dedupe_filter_ids,
        dedupe_filter_bytes=plan.dedupe_filter_mb * 1024 * 1024,
        session_timeout_ms=config.consumer_session_timeout_ms,
        heartbeat_interval_ms=config.consumer_heartbeat_interval_ms,
        client_id=f"viewevents-{endpoint.name}",
        metrics_name=endpoint.name,
        advertised_address=endpoint.advertised_address or endpoint.address,
        fetch_max_bytes=plan.fetch_max_bytes,
        max_partition_fetch_bytes=plan.max_partition_fetch_bytes,
        group_commit_interval_ms=config.group_commit_interval_ms,
    )


MALLOC_TRIM_S = 10.0  # how often freed heap memory is handed back to the kernel


async def _trim_malloc_periodically(seconds: float = MALLOC_TRIM_S) -> None:
    """Call glibc's malloc_trim every `seconds`. Each batch allocates and frees tens of MiB
    (fetched records, decoded columns, RocksDB write batches) across several threads' arenas,
    and glibc keeps much of it mapped. Measured on the stats consumer (load 20 to 50, noisy):
    after 100 s of a 1M-event topic RSS 213 and 261 MiB with the trim, 321 without; along a
    1M-event stream (benchmarks/rss_stream.py) the mean sampled RSS fell from 383 to 330 MiB,
    but the peak did not (542 without, 561 with). Runs in a worker thread; a no-op where libc
    has no malloc_trim (e.g. musl)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    while True:
        await asyncio.sleep(seconds)
        await asyncio.to_thread(trim, 0)


MEMORY_REPORT_S = 60.0  # a log line per minute: RSS next to what RocksDB says it holds


async def _report_memory(
    store: StateStore, plan: MemoryPlan, service: ReportsMemory | None = None
) -> None:
    """Log the process's RSS next to RocksDB's own accounting, the service's own caches and
    glibc malloc's totals, so that a growing RSS (soak, docs/operations.md) can be told apart:
    RocksDB within its shares, the service's caches, live native memory (malloc in use and
    mmapped) or memory freed but kept by the allocator (malloc free)."""
    page = os.sysconf("SC_PAGE_SIZE")
    while True:
        await asyncio.sleep(MEMORY_REPORT_S)
        try:
            with open("/proc/self/statm") as statm:
                rss = int(statm.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            rss = 0
        rocks = store.memory_bytes()
        own = service.memory_bytes() if service is not None else {}
        heap = heap_usage()
        log.info(
            "memory: RSS %.0f MiB of a %d MiB budget; RocksDB %s MiB; caches %s MiB; malloc %s",
            rss / 2**20,
            plan.budget_mb,
            {k: round(v / 2**20, 1) for k, v in rocks.items()},
            {k: round(v / 2**20, 1) for k, v in own.items()},
            "n/a"
            if heap is None
            else f"in use {heap.in_use / 2**20:.0f}, mmapped {heap.mmapped / 2**20:.0f}, "
            f"free {heap.free / 2**20:.0f} MiB",
        )
        if tracemalloc.is_tracing():  # PYTHONTRACEMALLOC=1: where Python's own memory is
            current, peak = tracemalloc.get_traced_memory()
            top = tracemalloc.take_snapshot().statistics("lineno")[:8]
            log.info(
                "python heap %.0f MiB (peak %.0f): %s",
                current / 2**20,
                peak / 2**20,
                "; ".join(f"{s.traceback[0]} {s.size / 2**20:.1f} MiB" for s in top),
            )


def _stop_process_if_crashed(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("consumer stopped: %r", task.exception(), exc_info=task.exception())
        # Fail fast: a service that no longer consumes must not keep answering as if fresh.
        os.kill(os.getpid(), signal.SIGTERM)
