"""Server interceptors: request ids, latency metrics and bearer-token checks for every RPC."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import os
import time
from collections.abc import Sequence

import grpc

from viewevents.logs import REQUEST_ID
from viewevents.metrics import RPC_SECONDS


class RequestContextInterceptor(grpc.aio.ServerInterceptor):
    """Gives every RPC a request id (the caller's `x-request-id`, or a new one) for the logs,
    and records its duration and status code in the latency histogram."""

    def __init__(self, service: str) -> None:
        self.service = service
        # Wrapped handlers are built once per (method, handler), not per call: the request id
        # is read inside the wrapper. Bounded: a refusing handler (wrong token) is new per call.
        self._wrapped: dict[tuple[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        key = (handler_call_details.method, handler)
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            if len(self._wrapped) >= _MAX_WRAPPED:
                self._wrapped.clear()
            method = handler_call_details.method.rsplit("/", 1)[-1]
            wrapped = self._wrapped[key] = _wrap_handler(handler, self.service, method)
        return wrapped


_MAX_WRAPPED = 1024


def _request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's `x-request-id`, or a new one (16 hex digits)."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return value if isinstance(value, str) else value.decode()
    return os.urandom(8).hex()


def _wrap_handler(
    handler: grpc.RpcMethodHandler, service: str, method: str
) -> grpc.RpcMethodHandler:
    succeeded = RPC_SECONDS.labels(service, method, grpc.StatusCode.OK.name)

    def observe(
        started: float, context: grpc.aio.ServicerContext, failed: BaseException | None
    ) -> None:
        code = context.code() if hasattr(context, "code") else None
        if code is None:
            code = (
                grpc.StatusCode.UNKNOWN
                if failed is not None and not isinstance(failed, asyncio.CancelledError)
                else grpc.StatusCode.OK
            )
        elapsed = time.perf_counter() - started
        if code is grpc.StatusCode.OK:
            succeeded.observe(elapsed)
            return
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        RPC_SECONDS.labels(service, method, name).observe(elapsed)

    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def call_unary(request_or_iterator, context):
            token = REQUEST_ID.set(_request_id(context))
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

        unary_maker = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        return unary_maker(
            call_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    inner_stream = handler.unary_stream or handler.stream_stream

    async def call_stream(request_or_iterator, context):
        token = REQUEST_ID.set(_request_id(context))
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

    stream_maker = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_stream_rpc_method_handler
    )
    return stream_maker(
        call_stream,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on the protected services' methods."""

    def __init__(self, token: str, protected_services: Sequence[str]) -> None:
        self._expected = f"Bearer {token}".encode()
        self._protected = tuple(f"/{name}/" for name in protected_services)

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(self._protected):
            metadata = dict(handler_call_details.invocation_metadata or ())
            presented = str(metadata.get("authorization", "")).encode()
            if not hmac.compare_digest(presented, self._expected):
                handler = await continuation(handler_call_details)
                return _refusing_handler(
                    handler,
                    "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'",
                )
        return await continuation(handler_call_details)


def _refusing_handler(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    async def refuse(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request_or_iterator, context):
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
