#!/usr/bin/env bash
# End-to-end smoke test of deploy/docker-compose.yml on any Docker engine with compose v2:
#   make compose-check            (or deploy/compose-check.sh after `make install`)
# A throw-away deployment: its own project name, certificates, token, Kafka cluster id, image tag
# and free host ports, all in a temp dir, so an existing deployment (deploy/certs, deploy/.env, its
# containers, volumes, image and ports) is never touched. Steps: deploy/init.sh into the temp dir,
# `up -d --build --scale stats=$SCALE --scale recommender=$SCALE`, wait until every container is
# healthy, upload a generated event file over TLS with the bearer token (and check that it is
# refused without), then ask EACH stats and recommender replica directly: GetMediaStats of every
# media item against counts computed from the file and GetSimilarMedia against similarities
# computed from it, all complete; the partitions split over the replicas, each on its own store,
# each having had answers from its peers over TLS; `down` (volumes kept) + `up` and the same
# answers from every replica again, each store slot resuming where it was, then `down -v`. Prints
# a table; exits non-zero on any failure (with `docker compose ps` and logs); always tears down.
# Environment: SCALE (replicas of stats and of recommender, default 2, at most the 4 partitions;
# 1 checks the plain stack), HEALTHY_TIMEOUT (seconds for all containers to become healthy,
# default 420), ANSWER_TIMEOUT (seconds for the consumers to apply the upload, default 90),
# VENV (.venv).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$repo/.venv}
healthy_timeout=${HEALTHY_TIMEOUT:-420}
answer_timeout=${ANSWER_TIMEOUT:-90}
scale=${SCALE:-2}
containers=$((2 + 2 * scale))  # kafka, ingest, stats and recommender replicas
project=viewevents-check-$(date +%s)-$$
work=$(mktemp -d "${TMPDIR:-/tmp}/viewevents-check.XXXXXX")
results=$work/results.tsv
: >"$results"
started=$SECONDS

log() { echo "compose-check: $*" >&2; }
row() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$results"; }
compose() { docker compose -p "$project" -f "$repo/deploy/docker-compose.yml" --env-file "$work/.env" "$@"; }

table() {
  echo
  echo "compose-check: project $project, $((SECONDS - started)) s"
  awk -F'\t' 'BEGIN { printf "%-7s %-40s %s\n", "result", "step", "detail"
                      printf "%-7s %-40s %s\n", "------", "----", "------" }
              { printf "%-7s %-40s %s\n", $1, $2, $3 }' "$results"
}

failed=0
fail() {  # fail STEP DETAIL: record, show the evidence, and stop (the EXIT trap tears down)
  row FAILED "$1" "$2"
  failed=1
  log "FAILED: $1: $2"
  if [ -n "${up_done:-}" ]; then
    compose ps -a >&2 || true
    compose logs --no-color --timestamps --tail 150 >&2 || true
  fi
  exit 1
}

teardown() {
  local status=$?
  [ "$failed" = 1 ] && status=1
  set +e
  if [ -n "${up_done:-}" ]; then
    log "tearing down (down -v)"
    if compose down -v --remove-orphans >"$work/down.log" 2>&1; then
      row ok "down -v" "containers, network and volumes removed"
    else
      cat "$work/down.log" >&2
      row FAILED "down -v" "see the output above"
      status=1
    fi
    docker image rm "$VIEWEVENTS_IMAGE" >/dev/null 2>&1
  fi
  table
  rm -rf "$work"
  [ "$status" = 0 ] && echo "compose-check: PASSED" || echo "compose-check: FAILED"
  exit "$status"
}
trap teardown EXIT
trap 'exit 130' INT TERM

command -v docker >/dev/null || fail "prerequisites" "docker is not installed"
docker compose version >/dev/null 2>&1 || fail "prerequisites" "needs the docker compose v2 plugin"
docker info >/dev/null 2>&1 || fail "prerequisites" "the Docker engine does not answer (docker info)"
[ -x "$venv/bin/viewevents" ] || fail "prerequisites" "no $venv/bin/viewevents: run make install"
py=$venv/bin/python

# 1. A deployment of its own: certificates, token, cluster id; free host ports; its own image tag.
"$repo/deploy/init.sh" "$work" 2>"$work/init.log" >/dev/null || { cat "$work/init.log" >&2; fail "init" "deploy/init.sh failed"; }
ports=$("$py" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
read -r p_ingest p_m1 <<<"$ports"
# Stats and recommender replicas: host ports picked by Docker, one per replica (empty here).
cat >>"$work/.env" <<EOF
VIEWEVENTS_IMAGE=viewevents:$project
HOST_PORT_INGEST=$p_ingest
HOST_PORT_INGEST_METRICS=$p_m1
HOST_PORT_STATS=
HOST_PORT_RECOMMENDER=
HOST_PORT_STATS_METRICS=
HOST_PORT_RECOMMENDER_METRICS=
EOF
set -a; . "$work/.env"; set +a  # the shell's own values must not override these
row ok "init (certs, token, cluster id)" "$work; ingest port $p_ingest; $scale x stats, $scale x recommender"

wait_healthy() {  # wait_healthy STEP: every container of the project running and healthy
  local t0=$SECONDS ids line bad states
  while :; do
    ids=$(compose ps -a -q)
    states=$(docker inspect -f '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}-{{end}} {{.RestartCount}}' $ids 2>/dev/null | sed "s|^/$project-||" || true)
    bad=$(awk '$2 == "exited" || $2 == "dead" || $4 > 0' <<<"$states")
    [ -z "$bad" ] || fail "$1" "crashed: $(tr '\n' ' ' <<<"$bad")"
    if [ "$(wc -w <<<"$ids")" = "$containers" ] && awk '$3 != "healthy" { bad = 1 } END { exit bad }' <<<"$states"; then
      row ok "$1" "$containers containers healthy after $((SECONDS - t0)) s"
      return
    fi
    if [ $((SECONDS - t0)) -ge "$healthy_timeout" ]; then
      fail "$1" "not healthy within ${healthy_timeout} s: $(awk '{printf "%s=%s ", $1, $3}' <<<"$states")"
    fi
    sleep 3
  done
}

# 2. Build once and start.
log "project $project: up -d --build (output in the table only when it fails)"
t0=$SECONDS
up_done=1
scaled=(--scale "stats=$scale" --scale "recommender=$scale")
if ! compose up -d --build "${scaled[@]}" >"$work/up.log" 2>&1; then
  tail -n 40 "$work/up.log" >&2
  fail "up -d --build" "failed (see above)"
fi
row ok "up -d --build" "$((SECONDS - t0)) s; image $VIEWEVENTS_IMAGE"
wait_healthy "all containers healthy"

# No anonymous volumes: every volume mount is one of the project's named volumes.
anon=$(docker inspect -f '{{range .Mounts}}{{if eq .Type "volume"}}{{.Name}} {{end}}{{end}}' $(compose ps -a -q) \
  | tr ' ' '\n' | grep -v -e '^$' -e "^${project}_" || true)
[ -z "$anon" ] || fail "no anonymous volumes" "$(tr '\n' ' ' <<<"$anon")"
row ok "no anonymous volumes" "only ${project}_{kafka-data,stats-state,recommender-state}"

# The stats and recommender replicas, one line each: service, container, hostname (what it
# advertises, with the container port), host gRPC and metrics ports, the state slot it holds.
list_replicas() {
  local service grpc metrics id ports
  for spec in "stats 50052 9102" "recommender 50053 9103"; do
    read -r service grpc metrics <<<"$spec"
    ports="{{(index (index .NetworkSettings.Ports \"$grpc/tcp\") 0).HostPort}} {{(index (index .NetworkSettings.Ports \"$metrics/tcp\") 0).HostPort}}"
    for id in $(compose ps -q "$service"); do
      printf '%s %s %s\n' "$service" \
        "$(docker inspect -f "{{.Name}} {{.Config.Hostname}} $ports" "$id" | sed "s|^/$project-||")" \
        "$(docker logs "$id" 2>&1 | grep -o 'this instance holds slot-[0-9]*' | tail -n 1 | sed 's/.* //')"
    done
  done | awk 'NF == 5 { $6 = "-" } { print }' | sort -k2 >"$work/replicas.txt"
  [ "$(wc -l <"$work/replicas.txt")" = $((2 * scale)) ] \
    || fail "$1" "expected $scale replicas of each: $(cat "$work/replicas.txt")"
  row ok "$1" "$(awk '{printf "%s=%s :%s %s; ", $2, $3, $4, $6}' "$work/replicas.txt")"
}
list_replicas "replicas: hostname, host port, store"

# 3. Upload over TLS with the token, then every replica's answers against the file.
"$py" "$repo/deploy/compose_check.py" gen "$work/events.jsonl"
client=(--viewevents "$venv/bin/viewevents" --ingest "127.0.0.1:$p_ingest" --replicas "$work/replicas.txt"
        --ca "$VIEWEVENTS_CERTS_DIR/ca.pem" --timeout "$answer_timeout")
log "upload and queries"
if ! "$py" "$repo/deploy/compose_check.py" verify "$work/events.jsonl" "$work/answers.json" \
    "${client[@]}" --token "$VIEWEVENTS_INGEST_TOKEN" >>"$results"; then
  fail "upload and queries" "see the rows above"
fi

# 4. State survives `down` (volumes kept) and `up`.
log "down (volumes kept), up again"
compose down >"$work/down1.log" 2>&1 || { cat "$work/down1.log" >&2; fail "down (volumes kept)" "failed"; }
compose up -d "${scaled[@]}" >"$work/up2.log" 2>&1 || { tail -n 40 "$work/up2.log" >&2; fail "up again" "failed"; }
wait_healthy "healthy again after down + up"
list_replicas "replicas after down + up"
mkdir -p "$work/logs"
while read -r _ container _; do
  docker logs "$project-$container" >"$work/logs/$container.log" 2>&1
done <"$work/replicas.txt"
"$py" "$repo/deploy/compose_check.py" again "$work/answers.json" "${client[@]}" \
  --logs "$work/logs" >>"$results" || fail "state after down + up" "see the row above"
