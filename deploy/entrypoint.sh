#!/bin/sh
# Entrypoint of the viewevents image: start-up checks with a clear message, then the command
# (`python -m ingest_service|stats_service|recommender_service`, from deploy/docker-compose.yml).
#  * TLS on (VIEWEVENTS_TLS_CERT_FILE / _KEY_FILE set): both files must exist and be readable;
#    a missing ./certs mount or an unreadable key otherwise ends in a Python traceback.
#  * The ingest service refuses to start with an empty VIEWEVENTS_INGEST_TOKEN: an ingest open
#    to anyone must not come up silently because a variable was missing.
set -eu

fail() {
  echo "viewevents: $*" >&2
  exit 78  # EX_CONFIG
}

for file in ${VIEWEVENTS_TLS_CERT_FILE:-} ${VIEWEVENTS_TLS_KEY_FILE:-}; do
  if [ ! -e "$file" ]; then
    fail "TLS file $file is missing (certificates not made yet?). On the Docker host, run" \
      "deploy/init.sh (or deploy/make-certs.sh) and start again; see docs/operations.md."
  fi
  if [ ! -r "$file" ]; then
    fail "TLS file $file is not readable by $(id) (mode $(ls -ln "$file" | cut -d' ' -f1))." \
      "deploy/make-certs.sh makes the key readable by group VIEWEVENTS_CERTS_GID, which the" \
      "compose file adds to the container; run deploy/init.sh to record that group in" \
      "deploy/.env (rootless Docker: VIEWEVENTS_CERTS_GID=0); see docs/operations.md."
  fi
done

case " $* " in
  *" ingest_service "*)
    case " $* " in *" --ingest-token"*) ;; *)
      if [ -z "${VIEWEVENTS_INGEST_TOKEN:-}" ]; then
        fail "VIEWEVENTS_INGEST_TOKEN is empty: refusing to run an ingest service open to" \
          "anyone. Run deploy/init.sh on the Docker host (it writes a token into deploy/.env)" \
          "or export VIEWEVENTS_INGEST_TOKEN, then up again."
      fi
    esac
    ;;
esac

exec "$@"
