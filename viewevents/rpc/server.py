"""The gRPC server's building blocks: limits and interceptors, TLS or plaintext ports, lenient
request parsing, reflection (for grpcurl) and grpc.health.v1, graceful stop on signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from viewevents.rpc.errors import lenient_parser
from viewevents.rpc.interceptors import BearerTokenInterceptor, RequestContextInterceptor

log = logging.getLogger(__name__)


def new_server(
    max_message_bytes: int = 8 * 1024 * 1024,
    service: str = "",
    token: str = "",
    protected_services: Sequence[str] = (),
) -> grpc.aio.Server:
    """An asyncio server with message-size limits (RESOURCE_EXHAUSTED beyond them), per-RPC
    request ids, logs and latency metrics, and, when `token` is set, bearer-token checks on
    the methods of `protected_services` (health and reflection stay open for probes)."""
    interceptors: list[grpc.aio.ServerInterceptor] = [RequestContextInterceptor(service)]
    if token:
        interceptors.append(BearerTokenInterceptor(token, protected_services))
    return grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            # gRPC sets SO_REUSEPORT by default, which lets a second instance silently share a
            # port with a stale one; a clash must fail at start instead.
            ("grpc.so_reuseport", 0),
        ],
    )


def bind(server: grpc.aio.Server, address: str, cert_file: str = "", key_file: str = "") -> None:
    """Listen on `address`: TLS when a certificate and key are configured, else plaintext."""
    if cert_file or key_file:
        if not (cert_file and key_file):
            raise ValueError("TLS needs both VIEWEVENTS_TLS_CERT_FILE and VIEWEVENTS_TLS_KEY_FILE")
        with open(key_file, "rb") as key, open(cert_file, "rb") as cert:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        server.add_secure_port(address, credentials)
        log.info("TLS on %s", address)
    else:
        port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")


class MethodSymbolPool:
    """The default descriptor pool, which also finds the file of a method's symbol.

    The reflection protocol lets a client ask for the file containing `package.Service.Method`
    (ghz does; grpcurl asks for the service), but protobuf's Python pool only knows services,
    messages, enums and fields, so such a request got "Symbol not found"."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool or descriptor_pool.Default()

    def FindFileContainingSymbol(self, full_name: str) -> FileDescriptor:  # noqa: N802 - pool API
        try:
            return self._pool.FindFileContainingSymbol(full_name)
        except KeyError:
            service, _, method = full_name.rpartition(".")
            if not service or method not in self._pool.FindServiceByName(service).methods_by_name:
                raise
            return self._pool.FindFileContainingSymbol(service)

    def __getattr__(self, name: str) -> object:
        return getattr(self._pool, name)


async def enable_reflection_and_health(
    server: grpc.aio.Server, full_service_names: Sequence[str]
) -> health.aio.HealthServicer:
    """Server reflection (for grpcurl) and grpc.health.v1; health starts NOT_SERVING."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(full_service_names) + [
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    ]
    reflection.enable_server_reflection(names, server, pool=MethodSymbolPool())
    await set_serving(health_servicer, full_service_names, False)
    return health_servicer


async def set_serving(
    health_servicer: health.aio.HealthServicer, full_service_names: Iterable[str], serving: bool
) -> None:
    """Set the overall ("") and per-service health status."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ["", *full_service_names]:
        await health_servicer.set(name, status)


async def serve_until_stopped(
    server: grpc.aio.Server,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    grace_seconds: float = 10.0,
    exit_within_seconds: float | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until SIGINT/SIGTERM (or until `stop` is set, when the caller handles the signals),
    then stop taking RPCs, let in-flight ones finish within `grace_seconds` and run `on_stop`.

    `on_stop` must bound its own steps; as a last resort, when `exit_within_seconds` is set and
    the process is still alive that long after the signal, it exits with status 70 (like
    kill -9, which the stores are built to survive): a supervisor's stop must never hang.
    """
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if exit_within_seconds is not None:
        exit_after(exit_within_seconds)
    log.info("shutting down: finishing in-flight RPCs (grace %.0f s)", grace_seconds)
    await server.stop(grace_seconds)
    if on_stop is not None:
        await on_stop()
    log.info("stopped")


def exit_after(seconds: float) -> None:
    """A daemon timer that ends the process if shutdown is still under way after `seconds`."""

    def give_up() -> None:
        log.critical("shutdown still under way after %.0f s; exiting now", seconds)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(70)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()


def add_service(server: grpc.aio.Server, service_descriptor: object, servicer: object) -> None:
    """Register `servicer`'s methods for a proto service, parsing requests leniently.

    Like the generated add_*Servicer_to_server, but built from the descriptor, with request
    parsing that hands `Unparseable` to the method rather than failing inside gRPC. Methods the
    servicer names in `RAW_REQUEST_METHODS` get the request bytes unparsed (the servicer reads
    them itself, e.g. without a message per repeated element).
    """
    from google.protobuf import message_factory

    raw = frozenset(getattr(servicer, "RAW_REQUEST_METHODS", ()))
    handlers = {}
    for method in service_descriptor.methods:  # type: ignore[attr-defined]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            behaviour,
            request_deserializer=None if method.name in raw else lenient_parser(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service_descriptor.full_name, handlers),)  # type: ignore[attr-defined]
    )
