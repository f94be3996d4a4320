#!/usr/bin/env bash
# A private CA and a server certificate for the compose stack (TLS is on there):
#   deploy/make-certs.sh [DIR]      -> DIR (default deploy/certs)/{ca.pem,server.pem,server.key,ca.key}
# Clients trust ca.pem (grpcurl -cacert deploy/certs/ca.pem ...). Existing certificates are never
# replaced (clients trust that CA); FORCE=1 makes new ones.
# Permissions are set explicitly, whatever the umask:
#   ca.pem, server.pem  0644  public
#   server.key          0640  readable by the file's group only. The compose file adds group
#                             VIEWEVENTS_CERTS_GID (deploy/init.sh records this file's group in
#                             deploy/.env) to the containers, whose user is uid 10001 / gid 10001.
#                             Run as root, the group is 10001 itself (no host group is involved).
#   ca.key              0600  the CA's key, for the host user only (the containers never read it)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/certs}
umask 077  # nothing is ever readable by others while it is being written
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -z "${FORCE:-}" ] && { [ -e "$out/ca.pem" ] || [ -e "$out/server.key" ]; }; then
  echo "make-certs.sh: $out already has certificates; kept (FORCE=1 replaces them)" >&2
  exit 0
fi
cd "$out"
rm -f ca.pem ca.key server.pem server.key
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=viewevents local CA" \
  -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=DNS:localhost,DNS:ingest,DNS:stats,DNS:recommender,IP:127.0.0.1\n' > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 \
  -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
if [ "$(id -u)" = 0 ]; then
  chgrp 10001 server.key  # the image's service group; no host group gets access
fi
chmod 0755 .            # the container user must be able to enter the directory
chmod 0644 ca.pem server.pem
chmod 0640 server.key
chmod 0600 ca.key
echo "wrote $out/{ca.pem,server.pem,server.key} (server.key: mode 0640, group $(ls -ln server.key | awk '{print $4}'))"
