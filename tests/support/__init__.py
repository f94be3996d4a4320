"""Helpers shared by the tests, one module per concern; no test module imports another.

configs (REPO, test_config, free_port...), waits (wait_for: the one polling loop), broker (the
local Kafka and reading topics), processes (services as subprocesses), positions (waiting until
a consumer applied an upload), data (generated and random events), oracles (brute-force answers),
grpcurl (the real grpcurl), certs (throw-away TLS certificates), request_fields (typed keyword
arguments of request messages). The common names are re-exported here.
"""

from tests.support.broker import end_offsets, ensure_broker, read_topic, stop_broker
from tests.support.configs import (
    REPO,
    TEST_KAFKA_PORT,
    config_env,
    free_port,
    port_open,
    stack_config,
    test_config,
    unique_name,
)
from tests.support.processes import RUNNING, ServiceProcess
from tests.support.waits import wait_for

__all__ = [
    "REPO",
    "RUNNING",
    "TEST_KAFKA_PORT",
    "ServiceProcess",
    "config_env",
    "end_offsets",
    "ensure_broker",
    "free_port",
    "port_open",
    "read_topic",
    "stop_broker",
    "stack_config",
    "test_config",
    "unique_name",
    "wait_for",
]
