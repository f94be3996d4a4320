#!/usr/bin/env bash
# A private CA and a server certificate for the compose stack (TLS is on there):
#   deploy/make-certs.sh            -> deploy/certs/{ca.pem,server.pem,server.key}
# Clients trust deploy/certs/ca.pem (grpcurl -cacert deploy/certs/ca.pem ...).
set -euo pipefail
out=$(cd "$(dirname "$0")" && pwd)/certs
mkdir -p "$out" && cd "$out"
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=viewevents local CA" \
  -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=DNS:localhost,DNS:ingest,DNS:stats,DNS:recommender,IP:127.0.0.1\n' > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 \
  -extfile server.ext -out server.pem 2>/dev/null
chmod 644 server.key  # read by the services' non-root user inside the containers
rm -f server.csr server.ext ca.srl
echo "wrote $out/{ca.pem,server.pem,server.key}"
