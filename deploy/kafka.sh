#!/usr/bin/env bash
# A single-node Apache Kafka (KRaft) broker on loopback, for development and the test suite.
#   deploy/kafka.sh fetch   fetch the broker jars with Maven into the cache (idempotent)
#   deploy/kafka.sh format  fetch if needed, write the config, format storage once
#   deploy/kafka.sh start   format if needed, start, wait until ready
#   deploy/kafka.sh stop    stop the broker started by `start` and wait for it to exit
#   deploy/kafka.sh status  exit 0 when the broker answers on its port
# Settings (environment): KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (KAFKA_PORT+1),
# KAFKA_HOME (<repo>/.cache/kafka: jars), KAFKA_DATA_DIR (<repo>/.data/kafka-<port>),
# KAFKA_HEAP (512m), KAFKA_PARTITIONS (default partitions of new topics, 4),
# KAFKA_MESSAGE_MAX_BYTES (broker message.max.bytes, 8388608; Kafka's own default is 1048588),
# KAFKA_CLUSTER_ID (the id `format` writes into new storage; random when unset).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
port=${KAFKA_PORT:-9092}
controller_port=${KAFKA_CONTROLLER_PORT:-$((port + 1))}
home=${KAFKA_HOME:-$repo/.cache/kafka}
libs=$home/libs
data=${KAFKA_DATA_DIR:-$repo/.data/kafka-$port}
heap=${KAFKA_HEAP:-512m}
partitions=${KAFKA_PARTITIONS:-4}
message_max_bytes=${KAFKA_MESSAGE_MAX_BYTES:-8388608}
pidfile=$data/broker.pid
logfile=$data/broker.log

log() { echo "kafka.sh: $*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

fetch() {
  if [ -f "$libs/.complete" ]; then return 0; fi
  log "fetching Apache Kafka jars with Maven into $libs"
  rm -rf "$libs"
  mvn -q -B -f "$repo/deploy/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$libs" -DincludeScope=runtime
  touch "$libs/.complete"
}

java_cmd() {
  java -Xms"$heap" -Xmx"$heap" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$repo/deploy/kafka-log4j2.yaml" \
    -Dkafka.logs.dir="$data/logs" -cp "$libs/*" "$@"
}

write_config() {
  mkdir -p "$data"
  cat >"$data/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$data/log
num.partitions=$partitions
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
message.max.bytes=$message_max_bytes
log.retention.hours=-1
log.segment.bytes=268435456
PROPS
}

# A random cluster id as Kafka's own Uuid.randomUuid() makes it: 16 random bytes, URL-safe base64
# without padding, never starting with '-' (which the storage tool's argument parser reads as an
# option: 1 id in 64 did, and formatting failed). With an argument N, prints N ids.
random_cluster_id() {
  python3 - "${1:-1}" <<'PY'
import base64, os, sys
for _ in range(int(sys.argv[1])):
    while (i := base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")).startswith("-"):
        pass
    print(i)
PY
}

format() {  # format the storage once (keeps an existing one)
  fetch
  write_config
  if [ -f "$data/log/meta.properties" ]; then return 0; fi
  local cluster_id=${KAFKA_CLUSTER_ID:-$(random_cluster_id)}
  log "formatting KRaft storage in $data/log (cluster $cluster_id)"
  if ! java_cmd kafka.tools.StorageTool format --cluster-id="$cluster_id" \
    --config="$data/server.properties" >"$data/format.log" 2>&1; then
    log "formatting failed; $data/format.log says:"
    tail -n 20 "$data/format.log" >&2
    return 1
  fi
}

start() {
  if port_open "$port"; then
    log "a broker already answers on 127.0.0.1:$port; reusing it"
    return 0
  fi
  format
  log "starting broker on 127.0.0.1:$port (log: $logfile)"
  setsid nohup java -Xms"$heap" -Xmx"$heap" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$repo/deploy/kafka-log4j2.yaml" \
    -Dkafka.logs.dir="$data/logs" -cp "$libs/*" kafka.Kafka "$data/server.properties" \
    >"$logfile" 2>&1 </dev/null &
  echo $! >"$pidfile"
  for _ in $(seq 1 120); do
    if grep -q "Kafka Server started" "$logfile" 2>/dev/null && port_open "$port"; then
      log "broker ready on 127.0.0.1:$port"
      return 0
    fi
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      log "broker exited during start-up; last lines of $logfile:"
      tail -n 30 "$logfile" >&2
      return 1
    fi
    sleep 0.5
  done
  log "broker not ready after 60 s; see $logfile"
  return 1
}

stop() {
  if [ ! -f "$pidfile" ]; then log "no broker started from $data"; return 0; fi
  local pid
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping broker (pid $pid)"
    kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { log "broker did not stop in 30 s; killing it"; kill -9 "$pid"; }
  fi
  rm -f "$pidfile"
}

case "${1:-}" in
  fetch) fetch ;;
  format) format ;;
  start) start ;;
  stop) stop ;;
  status) port_open "$port" ;;
  classpath) fetch; echo "$libs/*" ;;
  *) echo "usage: $0 fetch|format|start|stop|status|classpath" >&2; exit 2 ;;
esac
