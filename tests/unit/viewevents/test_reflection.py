"""Server reflection answers every symbol form the protocol allows, method names included (ghz
asks for `package.Service.Method`; protobuf's Python pool alone does not know methods)."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from viewevents.rpc.server import enable_reflection_and_health
from viewevents.v1 import ingest_service_pb2

SERVICE = ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name


async def _ask(symbols: list[str]) -> list[reflection_pb2.ServerReflectionResponse]:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await enable_reflection_and_health(server, [SERVICE])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = stub.ServerReflectionInfo(
                iter(
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=s)
                    for s in symbols
                )
            )
            return [response async for response in call]
    finally:
        await server.stop(None)


def _file_names(response: reflection_pb2.ServerReflectionResponse) -> set[str]:
    return {
        descriptor_pb2.FileDescriptorProto.FromString(raw).name
        for raw in response.file_descriptor_response.file_descriptor_proto
    }


def test_a_method_symbol_finds_its_service_file_and_unknown_ones_are_not_found() -> None:
    by_service, by_method, unknown_method, unknown = asyncio.run(
        _ask([SERVICE, f"{SERVICE}.Upload", f"{SERVICE}.NoSuchMethod", "viewevents.v1.Nope.Upload"])
    )
    assert "viewevents/v1/ingest_service.proto" in _file_names(by_service)
    assert _file_names(by_method) == _file_names(by_service)
    for response in (unknown_method, unknown):
        assert response.WhichOneof("message_response") == "error_response"
        assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
