"""deploy/kafka.sh formats broker storage with any cluster id Kafka can make.

URL-safe base64 ids start with '-' one time in 64; the storage tool read such an id as an option
and formatting failed (a fresh-clone CI run hit it).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.broker import broker_env
from tests.support.configs import REPO, free_port

KAFKA_SH = REPO / "deploy" / "kafka.sh"


def test_format_accepts_a_cluster_id_starting_with_a_dash(tmp_path: Path) -> None:
    cluster_id = "-S0O_TLgRRW1T78WAULz4w"  # the id that failed in CI
    env = dict(broker_env(free_port(), tmp_path / "kafka"), KAFKA_CLUSTER_ID=cluster_id)
    subprocess.run([str(KAFKA_SH), "format"], env=env, check=True, timeout=120)
    meta = (tmp_path / "kafka" / "log" / "meta.properties").read_text()
    assert f"cluster.id={cluster_id}" in meta.splitlines()


def test_random_cluster_ids_never_start_with_a_dash(tmp_path: Path) -> None:
    """Ids drawn the way `format` draws one when none is set: 1 in 64 of the old ones failed."""
    script = f'source <(sed -n "/^random_cluster_id()/,/^}}/p" {KAFKA_SH}); random_cluster_id 2000'

    ids = subprocess.run(
        ["bash", "-c", script], check=True, capture_output=True, text=True, timeout=120
    ).stdout.split()
    assert len(ids) == 2000 and len(set(ids)) == 2000
    assert all(len(i) == 22 and not i.startswith("-") for i in ids), ids
