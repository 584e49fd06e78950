#!/usr/bin/env bash
# Coordinator: start the Flower SuperLink with TLS and node authentication (allow-list).
#   deploy/superlink.sh [ENV_FILE]            settings from ENV_FILE (default deploy/superlink.env)
#   deploy/superlink.sh --insecure [ENV_FILE] no TLS, no node auth: loopback benchmarks ONLY
# Needs fedtune's virtual environment on PATH (flower-superlink starts flower-superexec from PATH).
set -euo pipefail
insecure=0
if [[ "${1:-}" == "--insecure" ]]; then insecure=1; shift; fi
env_file="${1:-$(dirname "$0")/superlink.env}"
set -a; source "$env_file"; set +a
mkdir -p "$FEDTUNE_STATE"
args=(--host "$FEDTUNE_HOST" --port "$FEDTUNE_PORT" --database "$FEDTUNE_STATE/superlink.db"
      --disable-runtime-dependency-installation)
if (( insecure )); then
  cat >&2 <<'WARN'
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  INSECURE MODE: no TLS and no node authentication. Anyone who can reach
!!  this port can join the federation, start runs and read every update.
!!  Use only on 127.0.0.1 for benchmarks, never across institutions.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
WARN
  exec flower-superlink "${args[@]}" --insecure
fi
for f in ca.crt server.crt server.key; do
  [[ -r "$FEDTUNE_CERTS/$f" ]] || { echo "missing $FEDTUNE_CERTS/$f: run 'fedtune certs init'" >&2; exit 2; }
done
exec flower-superlink "${args[@]}" \
  --ssl-ca-certfile "$FEDTUNE_CERTS/ca.crt" \
  --ssl-certfile "$FEDTUNE_CERTS/server.crt" \
  --ssl-keyfile "$FEDTUNE_CERTS/server.key" \
  --enable-supernode-auth
