"""gRPC plumbing shared by the three services: server with reflection and health, rich errors."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from viewevents.logs import REQUEST_ID
from viewevents.metrics import RPC_SECONDS
from viewevents.v1 import view_event_pb2

log = logging.getLogger(__name__)


Violation = view_event_pb2.FieldViolation


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


class RequestContextInterceptor(grpc.aio.ServerInterceptor):
    """Gives every RPC a request id (the caller's `x-request-id`, or a new one) for the logs,
    and records its duration and status code in the latency histogram."""

    def __init__(self, service: str) -> None:
        self.service = service

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        incoming = dict(handler_call_details.invocation_metadata or ())
        request_id = incoming.get("x-request-id") or uuid.uuid4().hex[:16]
        return _wrap_handler(handler, self.service, method, request_id)


def _wrap_handler(handler: grpc.RpcMethodHandler, service: str, method: str, request_id: str) -> grpc.RpcMethodHandler:
    def observe(started: float, context: grpc.aio.ServicerContext, failed: BaseException | None) -> None:
        code = context.code() if hasattr(context, "code") else None
        if code is None:
            code = grpc.StatusCode.UNKNOWN if failed is not None and not isinstance(
                failed, asyncio.CancelledError) else grpc.StatusCode.OK
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        RPC_SECONDS.labels(service, method, name).observe(time.perf_counter() - started)

    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def call(request_or_iterator, context):  # type: ignore[no-untyped-def]
            token = REQUEST_ID.set(request_id)
            started, failed = time.perf_counter(), None
            try:
                result = inner(request_or_iterator, context)
                return await result if inspect.isawaitable(result) else result
            except BaseException as error:
                failed = error
                raise
            finally:
                observe(started, context, failed)
                REQUEST_ID.reset(token)

        maker = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
    else:
        inner_stream = handler.unary_stream or handler.stream_stream

        async def call(request_or_iterator, context):  # type: ignore[no-untyped-def]
            token = REQUEST_ID.set(request_id)
            started, failed = time.perf_counter(), None
            try:
                responses = inner_stream(request_or_iterator, context)
                if hasattr(responses, "__aiter__"):
                    async for response in responses:
                        yield response
                else:
                    for response in responses:
                        yield response
            except BaseException as error:
                failed = error
                raise
            finally:
                observe(started, context, failed)
                REQUEST_ID.reset(token)

        maker = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
    return maker(call, request_deserializer=handler.request_deserializer,
                 response_serializer=handler.response_serializer)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on the protected services' methods."""

    def __init__(self, token: str, protected_services: Sequence[str]) -> None:
        self._expected = f"Bearer {token}".encode()
        self._protected = tuple(f"/{name}/" for name in protected_services)

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        if handler_call_details.method.startswith(self._protected):
            metadata = dict(handler_call_details.invocation_metadata or ())
            presented = str(metadata.get("authorization", "")).encode()
            if not hmac.compare_digest(presented, self._expected):
                handler = await continuation(handler_call_details)
                return _refusing_handler(handler, "missing or wrong bearer token: send metadata "
                                         "'authorization: Bearer <VIEWEVENTS_INGEST_TOKEN>'")
        return await continuation(handler_call_details)


def _refusing_handler(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    async def refuse(request_or_iterator, context):  # type: ignore[no-untyped-def]
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request_or_iterator, context):  # type: ignore[no-untyped-def]
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    serializer = handler.response_serializer if handler else None
    deserializer = handler.request_deserializer if handler else None
    if handler is None or handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, deserializer, serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, deserializer, serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, deserializer, serializer)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, deserializer, serializer)


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
    reflection.enable_server_reflection(names, server)
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


def bad_request_status(message: str, violations: Sequence[Violation]) -> grpc.Status:
    """INVALID_ARGUMENT carrying google.rpc.BadRequest with one entry per field violation."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description, reason=v.reason
                )
                for v in violations
            ]
        )
    )
    return rpc_status.to_status(
        status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail])
    )


async def abort_bad_request(
    context: grpc.aio.ServicerContext, message: str, violations: Sequence[Violation]
) -> NoReturn:
    """Abort the RPC with INVALID_ARGUMENT and the field violations (AIP-193)."""
    await context.abort_with_status(bad_request_status(message, violations))
    raise AssertionError("unreachable")  # abort_with_status always raises


def field_violations_of(error: grpc.RpcError) -> list[Violation]:
    """The google.rpc.BadRequest field violations carried by a client-side error, if any."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    found: list[Violation] = []
    for detail in status.details if status else []:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            found += [
                Violation(field=v.field, description=v.description, reason=v.reason)
                for v in bad_request.field_violations
            ]
    return found


async def serve_until_stopped(
    server: grpc.aio.Server,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    grace_seconds: float = 10.0,
) -> None:
    """Run until SIGINT/SIGTERM, then stop taking RPCs and let in-flight ones finish."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing in-flight RPCs (grace %.0f s)", grace_seconds)
    await server.stop(grace_seconds)
    if on_stop is not None:
        await on_stop()
    log.info("stopped")


class Unparseable:
    """Stands in for a request whose bytes are not a valid message, so the handler can answer
    INVALID_ARGUMENT instead of gRPC's generic INTERNAL deserialization error."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.type_name = type_name
        self.error = error

    def describe(self) -> str:
        return f"the request could not be parsed as {self.type_name}: {self.error}"


def _lenient_parser(message_class: type) -> Callable[[bytes], object]:
    type_name = message_class.DESCRIPTOR.full_name

    def parse(data: bytes) -> object:
        try:
            return message_class.FromString(data)
        except Exception as error:  # noqa: BLE001 - any decode failure is the caller's fault
            return Unparseable(type_name, error)

    return parse


def add_service(server: grpc.aio.Server, service_descriptor: object, servicer: object) -> None:
    """Register `servicer`'s methods for a proto service, parsing requests leniently.

    Like the generated add_*Servicer_to_server, but built from the descriptor, with request
    parsing that hands `Unparseable` to the method rather than failing inside gRPC.
    """
    from google.protobuf import message_factory

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
            request_deserializer=_lenient_parser(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service_descriptor.full_name, handlers),)  # type: ignore[attr-defined]
    )


async def reject_unparseable(context: grpc.aio.ServicerContext, request: object) -> None:
    """Abort with INVALID_ARGUMENT (and a BadRequest detail, like every bad input) when
    `request` is `Unparseable`."""
    if isinstance(request, Unparseable):
        await abort_bad_request(context, request.describe(), [Violation(
            field="", reason="UNPARSEABLE",
            description=f"the request bytes are not a valid {request.type_name}: {request.error}")])
