"""TLS between instances of one service: scatter-gather calls to peers go over TLS and verify them.

Two stats and two recommender instances serve TLS only, with a certificate valid for
`localhost` and `viewevents-peer` but NOT for the 127.0.0.1 they advertise, as in
docker-compose --scale, where peers are reached at random container ids: they trust the CA
(`VIEWEVENTS_TLS_PEER_CA_FILE`) and check peers against `VIEWEVENTS_TLS_PEER_SERVER_NAME`. The
data is spread over both members of each group (each owns partitions, and each asked the other
over TLS), and a query to EACH instance answers completely and exactly (brute force). When a peer's
certificate comes from a CA the instance does not trust, the answer is UNAVAILABLE naming that
peer's partitions, never part of the data.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import grpc
import pytest

from recommender_service.similarity import Metric
from tests.support import ServiceProcess, end_offsets, free_port, test_config, unique_name
from tests.support.certs import make_ca_and_cert
from tests.support.data import accepted_events, first_copies, generated_events
from tests.support.oracles import BruteForce, Expected, assert_same_ranking, check_all_totals
from tests.support.positions import NOT_YET, covers
from tests.support.waits import wait_for
from viewevents.v1 import recommender_service_pb2 as rec_pb
from viewevents.v1 import recommender_service_pb2_grpc as rec_grpc
from viewevents.v1 import stats_service_pb2 as stats_pb
from viewevents.v1 import stats_service_pb2_grpc as stats_grpc
from viewevents.v1 import view_event_pb2 as ve
from viewevents_client.uploads import CHANNEL_OPTIONS, upload

PARTITIONS = 4
PEER_NAME = "viewevents-peer"  # in the certificate; the advertised 127.0.0.1 is not


def tls_channel(address: str, ca: Path) -> grpc.Channel:
    """A client channel to an instance, by the name its certificate has (localhost)."""
    port = address.rsplit(":", 1)[1]
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    return grpc.secure_channel(f"localhost:{port}", credentials)


def owners_seen(metrics_port: int, service: str) -> dict[str, int]:
    """{owner address: ok fan-out calls} from an instance's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    pattern = rf'viewevents_fanout_calls_total{{(?=[^}}]*service="{service}")(?=[^}}]*outcome="ok")[^}}]*owner="([^"]+)"[^}}]*}} (\S+)'
    return {owner: int(float(count)) for owner, count in re.findall(pattern, text)}


class TlsGroups:
    """An ingest service (plaintext) and TLS-only stats and recommender instances."""

    def __init__(self, tmp_path: Path, bootstrap: str) -> None:
        self.tmp_path = tmp_path
        self.ca, cert, key = make_ca_and_cert(
            tmp_path, "peers", ["DNS:localhost", f"DNS:{PEER_NAME}"]
        )
        self.config = test_config(
            bootstrap,
            ingest_address=f"127.0.0.1:{free_port()}",
            topic_partitions=PARTITIONS,
            stats_group=unique_name("tls-stats"),
            recommender_group=unique_name("tls-rec"),
            recommender_min_co_viewers=1,
            recommender_history_cap=100_000,
        )
        self.tls = dict(
            tls_cert_file=str(cert),
            tls_key_file=str(key),
            tls_peer_ca_file=str(self.ca),
            tls_peer_server_name=PEER_NAME,
        )
        self.ingest = ServiceProcess(
            "ingest_service", self.config, self.config.ingest_address, tmp_path / "ingest.log"
        ).start()
        self.processes: list[ServiceProcess] = [self.ingest]

    def add(self, module: str, name: str, **overrides: object) -> ServiceProcess:
        service = module.removesuffix("_service")
        address = f"127.0.0.1:{free_port()}"
        config = self.config.replace(
            **{
                **self.tls,
                f"{service}_address": address,
                f"{service}_state_dir": str(self.tmp_path / name),
                f"{service}_metrics_port": free_port(),
                **overrides,
            }
        )
        process = ServiceProcess(module, config, address, self.tmp_path / f"{name}.log").start()
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


@pytest.fixture
def groups(tmp_path: Path, kafka_bootstrap: str) -> Iterator[TlsGroups]:
    made = TlsGroups(tmp_path, kafka_bootstrap)
    yield made
    made.stop()


class Positioned(Protocol):
    """An answer that says how far its service had applied (stats and recommender replies)."""

    @property
    def position(self) -> ve.ConsumerPosition: ...


Ask = Callable[[grpc.Channel], Positioned]


def complete(process: ServiceProcess, ca: Path, ask: Ask, targets: dict[int, int]) -> bool:
    """A complete answer (every partition, at its target) from `process`, over TLS."""
    try:
        with tls_channel(process.address, ca) as channel:
            position = ask(channel).position
    except grpc.RpcError as error:
        if error.code() in NOT_YET:
            return False
        raise
    return len(position.partitions) == PARTITIONS and covers(position, targets)


def test_peers_call_each_other_over_tls_and_every_instance_answers_exactly(
    groups: TlsGroups, kafka_bootstrap: str, tmp_path: Path
) -> None:
    stats = [groups.add("stats_service", f"stats-{n}") for n in "ab"]
    recs = [groups.add("recommender_service", f"rec-{n}") for n in "ab"]
    groups.ingest.wait_serving()
    events = generated_events(
        tmp_path / "views.jsonl", 6_000, seed=23, users=400, media=60, noise=0.02
    )
    with grpc.insecure_channel(groups.config.ingest_address, options=CHANNEL_OPTIONS) as channel:
        upload(channel, iter(events), batch_size=2_000, timeout=300)
    kept = accepted_events(events, groups.config)
    expected, truth = Expected(first_copies(kept)), BruteForce(kept)
    targets = end_offsets(kafka_bootstrap, groups.config.view_topic)
    probe = max(expected.by_media, key=lambda m: len(expected.by_media[m]))

    def ask_stats(channel: grpc.Channel) -> stats_pb.GetMediaStatsResponse:
        return stats_grpc.StatsServiceStub(channel).GetMediaStats(
            stats_pb.GetMediaStatsRequest(media_id=probe), timeout=10
        )

    def ask_similar(channel: grpc.Channel) -> rec_pb.GetSimilarMediaResponse:
        return rec_grpc.RecommenderServiceStub(channel).GetSimilarMedia(
            rec_pb.GetSimilarMediaRequest(media_id=probe, limit=25), timeout=10
        )

    asks: list[tuple[ServiceProcess, Ask]] = [(s, ask_stats) for s in stats]
    asks += [(r, ask_similar) for r in recs]
    for process, ask in asks:

        def done(p: ServiceProcess = process, a: Ask = ask) -> bool:
            return complete(p, groups.ca, a, targets)

        def not_done(p: ServiceProcess = process) -> str:
            return f"{p.address} not complete:\n{p.tail()}"

        wait_for(done, 180, message=not_done)

    for process in stats:
        with tls_channel(process.address, groups.ca) as channel:
            check_all_totals(stats_grpc.StatsServiceStub(channel), expected)
    items = sorted(truth.items, key=lambda m: -int((truth.w[:, truth.col[m]] > 0).sum()))[:10]
    for process in recs:
        with tls_channel(process.address, groups.ca) as channel:
            stub = rec_grpc.RecommenderServiceStub(channel)
            for item in items:
                reply = stub.GetSimilarMedia(
                    rec_pb.GetSimilarMediaRequest(media_id=item, limit=25), timeout=30
                )
                assert len(reply.position.partitions) == PARTITIONS
                assert_same_ranking(
                    [s.media_id for s in reply.similar_media],
                    [s.score for s in reply.similar_media],
                    [s.co_viewers for s in reply.similar_media],
                    truth.scores(item, Metric.COSINE),
                    25,
                )

    # The data really was spread: each instance got answers from the other over TLS.
    for members, service in ((stats, "stats"), (recs, "recommender")):
        for me, other in (members, members[::-1]):
            calls = owners_seen(getattr(me.config, f"{service}_metrics_port"), service)
            assert calls.get(other.address, 0) > 0, (me.address, calls)


def test_a_peer_with_an_untrusted_certificate_makes_the_answer_unavailable(
    groups: TlsGroups, tmp_path: Path
) -> None:
    _, other_cert, other_key = make_ca_and_cert(
        tmp_path, "stranger", ["DNS:localhost", f"DNS:{PEER_NAME}"]
    )
    trusting = groups.add("stats_service", "stats-a")
    stranger = groups.add(
        "stats_service", "stats-b", tls_cert_file=str(other_cert), tls_key_file=str(other_key)
    )
    groups.ingest.wait_serving()
    seen: list[str] = []

    def refused() -> str | None:
        """The answer of the instance that trusts only its CA, once the group has both."""
        try:
            with tls_channel(trusting.address, groups.ca) as channel:
                stats_grpc.StatsServiceStub(channel).GetMediaStats(
                    stats_pb.GetMediaStatsRequest(media_id=1), timeout=10
                )
        except grpc.RpcError as error:
            seen[:] = [f"{error.code().name}: {error.details()}"]
            if error.code() == grpc.StatusCode.UNAVAILABLE and stranger.address in (
                error.details() or ""
            ):
                return error.details()
            return None
        seen[:] = ["an answer"]
        return None

    details = wait_for(
        refused,
        120,
        message=lambda: f"last outcome {seen}:\n{trusting.tail()}\n{stranger.tail()}",
    )
    missing = re.search(r"partitions ([\d,]+): owner " + re.escape(stranger.address), details)
    assert missing, details
    assert 0 < len(missing.group(1).split(",")) < PARTITIONS  # its share, named
