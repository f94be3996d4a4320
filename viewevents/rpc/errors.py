"""Errors in the gRPC rich error model (AIP-193): INVALID_ARGUMENT with google.rpc.BadRequest
field violations, requests whose bytes do not parse answered the same way, and UNAVAILABLE with
google.rpc.RetryInfo when part of the data is out of reach for a moment (never a partial answer)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from viewevents.v1 import view_event_pb2

Violation = view_event_pb2.FieldViolation


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


DEFAULT_RETRY_SECONDS = 1.0


def unavailable_status(message: str, retry_seconds: float = DEFAULT_RETRY_SECONDS) -> grpc.Status:
    """UNAVAILABLE carrying google.rpc.RetryInfo: the caller should retry after the delay."""
    detail = any_pb2.Any()
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(retry_seconds * 1e9))
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(
        status_pb2.Status(code=code_pb2.UNAVAILABLE, message=message, details=[detail])
    )


async def abort_unavailable(
    context: grpc.aio.ServicerContext, message: str, retry_seconds: float = DEFAULT_RETRY_SECONDS
) -> NoReturn:
    """Abort the RPC with UNAVAILABLE and a RetryInfo detail."""
    await context.abort_with_status(unavailable_status(message, retry_seconds))
    raise AssertionError("unreachable")  # abort_with_status always raises


def retry_delay_of(error: grpc.RpcError) -> float | None:
    """The google.rpc.RetryInfo delay (seconds) of a client-side error, if it carries one."""
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


def field_violations_of(error: grpc.RpcError) -> list[Violation]:
    """The google.rpc.BadRequest field violations carried by a client-side error, if any."""
    status = rpc_status.from_call(error)
    found: list[Violation] = []
    for detail in status.details if status else []:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            found += [
                Violation(field=v.field, description=v.description, reason=v.reason)
                for v in bad_request.field_violations
            ]
    return found


class Unparseable:
    """Stands in for a request whose bytes are not a valid message, so the handler can answer
    INVALID_ARGUMENT instead of gRPC's generic INTERNAL deserialization error."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.type_name = type_name
        self.error = error

    def describe(self) -> str:
        return f"the request could not be parsed as {self.type_name}: {self.error}"


def lenient_parser(message_class: type) -> Callable[[bytes], object]:
    """A request deserializer that returns `Unparseable` instead of raising."""
    type_name = message_class.DESCRIPTOR.full_name  # type: ignore[attr-defined]

    def parse(data: bytes) -> object:
        try:
            return message_class.FromString(data)  # type: ignore[attr-defined]
        except Exception as error:  # noqa: BLE001 - any decode failure is the caller's fault
            return Unparseable(type_name, error)

    return parse


async def reject_unparseable(context: grpc.aio.ServicerContext, request: object) -> None:
    """Abort with INVALID_ARGUMENT (and a BadRequest detail, like every bad input) when
    `request` is `Unparseable`."""
    if isinstance(request, Unparseable):
        await abort_bad_request(
            context,
            request.describe(),
            [
                Violation(
                    field="",
                    reason="UNPARSEABLE",
                    description=f"the request bytes are not a valid {request.type_name}: {request.error}",
                )
            ],
        )
