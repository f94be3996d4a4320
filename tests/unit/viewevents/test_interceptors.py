"""The server interceptors on a real in-process grpc.aio server (no Kafka, no service): request
ids reach the handler's log context, every RPC lands in the latency histogram under its method
and status code, and the bearer token guards only the protected services."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypedDict

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from viewevents.logs import REQUEST_ID
from viewevents.rpc.interceptors import BearerTokenInterceptor, RequestContextInterceptor

SERVICE = "test.Echo"


async def whoami(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """Answers the request id the handler sees in the log context."""
    return REQUEST_ID.get().encode()


async def missing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    return b""  # pragma: no cover - abort raises


async def countdown(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    """A server-streaming method: the id must be visible for the whole stream."""
    for _ in range(3):
        yield REQUEST_ID.get().encode()


def echo_handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "WhoAmI": grpc.unary_unary_rpc_method_handler(whoami),
            "Missing": grpc.unary_unary_rpc_method_handler(missing),
            "Countdown": grpc.unary_stream_rpc_method_handler(countdown),
        },
    )


def with_server(
    interceptors: list[grpc.aio.ServerInterceptor],
    client: Callable[[grpc.aio.Channel], Awaitable[None]],
) -> None:
    """Run `client` against a fresh server on a free port, then stop the server."""

    async def run() -> None:
        server = grpc.aio.server(interceptors=interceptors)
        server.add_generic_rpc_handlers([echo_handler()])
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")  # the kernel picks a free port
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await client(channel)
        finally:
            await server.stop(None)

    asyncio.run(run())


def rpc_count(service: str, method: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "viewevents_rpc_duration_seconds_count",
        {"service": service, "method": method, "code": code},
    )
    return value or 0.0


class _Seen(TypedDict, total=False):
    given: bytes
    new: list[bytes]
    stream: list[bytes]


def test_request_id_is_taken_from_the_caller_or_generated() -> None:
    seen: _Seen = {}

    async def client(channel: grpc.aio.Channel) -> None:
        call = channel.unary_unary(f"/{SERVICE}/WhoAmI")
        seen["given"] = await call(b"", metadata=[("x-request-id", "req-from-caller")])
        seen["new"] = [await call(b"") for _ in range(2)]
        stream = channel.unary_stream(f"/{SERVICE}/Countdown")
        seen["stream"] = [r async for r in stream(b"", metadata=[("x-request-id", "req-stream")])]

    with_server([RequestContextInterceptor("ids")], client)
    assert seen["given"] == b"req-from-caller"
    first, second = seen["new"]
    assert re.fullmatch(rb"[0-9a-f]{16}", first) and re.fullmatch(rb"[0-9a-f]{16}", second)
    assert first != second  # one per RPC
    assert seen["stream"] == [b"req-stream"] * 3
    assert REQUEST_ID.get() == "-"  # nothing leaks into this thread's context


def test_every_rpc_is_observed_with_method_and_code() -> None:
    before = {
        (m, c): rpc_count("metrics-test", m, c)
        for m, c in (("WhoAmI", "OK"), ("Missing", "NOT_FOUND"), ("Countdown", "OK"))
    }

    async def client(channel: grpc.aio.Channel) -> None:
        for _ in range(3):
            await channel.unary_unary(f"/{SERVICE}/WhoAmI")(b"")
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await channel.unary_unary(f"/{SERVICE}/Missing")(b"")
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
        assert len([r async for r in channel.unary_stream(f"/{SERVICE}/Countdown")(b"")]) == 3

    with_server([RequestContextInterceptor("metrics-test")], client)
    after = {key: rpc_count("metrics-test", *key) for key in before}
    assert {key: after[key] - before[key] for key in before} == {
        ("WhoAmI", "OK"): 3,
        ("Missing", "NOT_FOUND"): 1,
        ("Countdown", "OK"): 1,
    }
    assert rpc_count("metrics-test", "Missing", "OK") == 0


def test_bearer_token_guards_only_the_protected_services() -> None:
    codes: dict[str, object] = {}

    async def client(channel: grpc.aio.Channel) -> None:
        call = channel.unary_unary(f"/{SERVICE}/WhoAmI")
        for name, metadata in (
            ("missing", []),
            ("wrong", [("authorization", "Bearer nope")]),
            ("bare", [("authorization", "s3cret")]),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await call(b"", metadata=metadata)
            codes[name] = failure.value.code()
        stream = channel.unary_stream(f"/{SERVICE}/Countdown")
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            [r async for r in stream(b"")]
        codes["stream"] = failure.value.code()
        codes["right"] = await call(
            b"", metadata=[("authorization", "Bearer s3cret"), ("x-request-id", "with-token")]
        )
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        codes["health"] = reply.status

    with_server(
        [RequestContextInterceptor("auth-test"), BearerTokenInterceptor("s3cret", [SERVICE])],
        client,
    )
    assert codes == {
        "missing": grpc.StatusCode.UNAUTHENTICATED,
        "wrong": grpc.StatusCode.UNAUTHENTICATED,
        "bare": grpc.StatusCode.UNAUTHENTICATED,
        "stream": grpc.StatusCode.UNAUTHENTICATED,
        "right": b"with-token",
        "health": health_pb2.HealthCheckResponse.SERVING,
    }
    assert rpc_count("auth-test", "WhoAmI", "UNAUTHENTICATED") == 3
