#!/usr/bin/env bash
# Once per deployment, before the first `docker compose up` (running it again changes nothing):
#   deploy/init.sh         -> deploy/certs/ (deploy/make-certs.sh) and deploy/.env
#   deploy/init.sh DIR     -> DIR/certs and DIR/.env (then: docker compose --env-file DIR/.env ...)
# The .env file (mode 0600, git-ignored, never in the image) is read by `docker compose` from the
# compose file's directory and holds what differs per deployment:
#   VIEWEVENTS_INGEST_TOKEN  bearer token of the ingest service (random, 32 bytes hex)
#   KAFKA_CLUSTER_ID         the Kafka cluster's id (random, as `kafka-storage.sh random-uuid`);
#                            it is written into the broker's storage when that is first formatted
#   VIEWEVENTS_CERTS_GID     group of certs/server.key, added to the containers so they can read it
#   VIEWEVENTS_CERTS_DIR     (only with DIR) where the certificates are
# Values already in the file are kept; missing ones are added. Certificates are never replaced.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-$here}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
env_file=$dir/.env
certs=$dir/certs

"$here/make-certs.sh" "$certs"

umask 077
touch "$env_file"
chmod 0600 "$env_file"
has() { grep -q "^$1=" "$env_file"; }
add() {  # add NAME VALUE, unless NAME is already set in the file
  if has "$1"; then echo "init.sh: $1 kept ($env_file)" >&2; return; fi
  if [ -z "$2" ]; then echo "init.sh: could not make $1 (is openssl installed?)" >&2; exit 1; fi
  printf '%s=%s\n' "$1" "$2" >>"$env_file"
  echo "init.sh: $1 written to $env_file" >&2
}
gid_of() { stat -c %g "$1" 2>/dev/null || stat -f %g "$1"; }  # GNU, else BSD/macOS stat

add VIEWEVENTS_INGEST_TOKEN "$(openssl rand -hex 32)"
# As Kafka's own Uuid.randomUuid(): URL-safe base64 of 16 random bytes, never starting with '-'
# (argument parsers read that as an option).
cluster_id() {
  local id
  while id=$(openssl rand 16 | openssl base64 -A | tr '+/' '-_' | tr -d '='); [ "${id#-}" != "$id" ]; do :; done
  echo "$id"
}
add KAFKA_CLUSTER_ID "$(cluster_id)"
add VIEWEVENTS_CERTS_GID "$(gid_of "$certs/server.key")"
if [ "$dir" != "$here" ]; then add VIEWEVENTS_CERTS_DIR "$certs"; fi
