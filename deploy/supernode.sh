#!/usr/bin/env bash
# Site: start a Flower SuperNode with this site's node key, the coordinator's CA certificate and
# a node config naming the site's data folder.
#   deploy/supernode.sh [ENV_FILE]            settings from ENV_FILE (default deploy/supernode.env)
#   deploy/supernode.sh --insecure [ENV_FILE] no TLS, no node key: loopback benchmarks ONLY
# Needs fedtune (same version as the coordinator) installed in the environment on PATH.
set -euo pipefail
insecure=0
if [[ "${1:-}" == "--insecure" ]]; then insecure=1; shift; fi
env_file="${1:-$(dirname "$0")/supernode.env}"
set -a; source "$env_file"; set +a
[[ -d "$FEDTUNE_DATA" ]] || { echo "data folder $FEDTUNE_DATA does not exist" >&2; exit 2; }
args=(--superlink "$FEDTUNE_SUPERLINK" --host 127.0.0.1 --port "$FEDTUNE_RUNTIME_PORT"
      --node-config "data-dir='$FEDTUNE_DATA' site-name='$FEDTUNE_SITE'")
# process: ClientApp tasks are run by `fedtune site-exec` (deploy/site-exec.sh), warm;
# subprocess: Flower starts a fresh flwr-clientapp (torch imported again) for every message.
if [[ "${FEDTUNE_ISOLATION:-process}" == "process" ]]; then
  [[ -r "$FEDTUNE_EXEC_SECRET" ]] || { echo "missing SuperExec secret $FEDTUNE_EXEC_SECRET: run 'fedtune certs site'" >&2; exit 2; }
  args+=(--isolation process --superexec-auth-secret-file "$FEDTUNE_EXEC_SECRET")
fi
if (( insecure )); then
  cat >&2 <<'WARN'
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  INSECURE MODE: no TLS and no node authentication. This site's updates
!!  travel in clear text to whoever answers at the SuperLink address.
!!  Use only on 127.0.0.1 for benchmarks, never across institutions.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
WARN
  exec flower-supernode "${args[@]}" --insecure
fi
[[ -r "$FEDTUNE_CA" ]] || { echo "missing CA certificate $FEDTUNE_CA" >&2; exit 2; }
[[ -r "$FEDTUNE_KEY" ]] || { echo "missing node key $FEDTUNE_KEY: run 'fedtune certs site'" >&2; exit 2; }
exec flower-supernode "${args[@]}" \
  --root-certificates "$FEDTUNE_CA" \
  --auth-supernode-private-key "$FEDTUNE_KEY"
