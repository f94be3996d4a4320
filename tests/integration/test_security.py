"""Optional TLS on gRPC ports and the ingest bearer token, against the real service."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tests.support.certs import make_ca_and_cert
from tests.support.configs import free_port, test_config
from tests.support.processes import ServiceProcess
from viewevents.v1 import ingest_service_pb2 as pb
from viewevents.v1 import ingest_service_pb2_grpc as pb_grpc
from viewevents.v1 import view_event_pb2 as ve


def one_event() -> pb.PublishRequest:
    return pb.PublishRequest(
        events=[
            ve.ViewEvent(
                event_id="sec-1",
                media_id=1,
                user_id=2,
                event_type=ve.EVENT_TYPE_STREAM_START,
                event_time=Timestamp(seconds=int(time.time())),
            )
        ]
    )


def test_tls_and_bearer_token(kafka_bootstrap: str, tmp_path: Path) -> None:
    ca, cert, key = make_ca_and_cert(tmp_path, "good")
    other_ca, _, _ = make_ca_and_cert(tmp_path, "other")
    metrics_port = free_port()
    config = test_config(
        kafka_bootstrap,
        ingest_address=f"127.0.0.1:{free_port()}",
        tls_cert_file=str(cert),
        tls_key_file=str(key),
        ingest_token="s3cret",
        ingest_metrics_port=metrics_port,
    )
    service = ServiceProcess(
        "ingest_service", config, config.ingest_address, tmp_path / "log"
    ).start()
    try:
        good = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
        with grpc.secure_channel(config.ingest_address, good) as channel:
            service.wait_serving(60, channel)  # health stays open without a token (for probes)
            stub = pb_grpc.IngestServiceStub(channel)
            with pytest.raises(grpc.RpcError) as missing:
                stub.Publish(one_event())
            assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as wrong:
                stub.Publish(one_event(), metadata=[("authorization", "Bearer nope")])
            assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as streaming:
                stub.Upload(iter([pb.UploadRequest(events=one_event().events)]))
            assert streaming.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = stub.Publish(one_event(), metadata=[("authorization", "Bearer s3cret")])
            assert reply.accepted == 1

        wrong_ca = grpc.ssl_channel_credentials(root_certificates=other_ca.read_bytes())
        with grpc.secure_channel(config.ingest_address, wrong_ca) as channel:
            with pytest.raises(grpc.RpcError) as untrusted:
                pb_grpc.IngestServiceStub(channel).Publish(
                    one_event(), metadata=[("authorization", "Bearer s3cret")], timeout=5
                )
            assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE

        with grpc.insecure_channel(config.ingest_address) as channel:  # plaintext is refused too
            with pytest.raises(grpc.RpcError):
                pb_grpc.IngestServiceStub(channel).Publish(one_event(), timeout=5)

        metrics = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        assert "viewevents_events_accepted_total 1.0" in metrics
        assert (
            'viewevents_rpc_duration_seconds_count{code="UNAUTHENTICATED",method="Publish",service="ingest"} 2.0'
            in metrics
        )
    finally:
        service.stop()
