#!/usr/bin/env bash
# Coordinator: put site public keys on the SuperLink's allow-list.
#   deploy/register-sites.sh FEDERATION KEY.pub [KEY.pub ...]
# FEDERATION is an entry of $FLWR_HOME/config.toml (see deploy/flwr-config.toml). Check each key's
# fingerprint with its site out of band first:  ssh-keygen -l -f KEY.pub
set -euo pipefail
federation="${1:?usage: register-sites.sh FEDERATION KEY.pub [KEY.pub ...]}"; shift
(( $# )) || { echo "no public keys given" >&2; exit 2; }
for key in "$@"; do
  name="$(basename "$key" .pub)"
  flwr supernode register "$key" "$federation" --name "$name"
done
flwr supernode ls "$federation"
