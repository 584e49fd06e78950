#!/usr/bin/env bash
# Site: run this site's ClientApp tasks with `fedtune site-exec`, next to a SuperNode started by
# deploy/supernode.sh with FEDTUNE_ISOLATION=process. torch, transformers and peft are imported
# once; every task forks from there (about 0.1 s instead of 6-9 s per message).
#   deploy/site-exec.sh [ENV_FILE]   settings from ENV_FILE (default deploy/supernode.env)
set -euo pipefail
env_file="${1:-$(dirname "$0")/supernode.env}"
set -a; source "$env_file"; set +a
[[ -r "$FEDTUNE_EXEC_SECRET" ]] || { echo "missing SuperExec secret $FEDTUNE_EXEC_SECRET: run 'fedtune certs site'" >&2; exit 2; }
# The Runtime API is the SuperNode's own, on 127.0.0.1: plain HTTP that never leaves the host;
# the shared secret keeps other local processes from taking the site's tasks.
exec fedtune site-exec --runtime-api-address "127.0.0.1:$FEDTUNE_RUNTIME_PORT" --insecure \
  --superexec-auth-secret-file "$FEDTUNE_EXEC_SECRET"
