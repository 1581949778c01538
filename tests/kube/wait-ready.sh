#!/usr/bin/env bash
# Waits (at most 90 s) until the kube-apiserver started in DIR answers /readyz; exits 1 when
# it or etcd exits first, or time runs out.
set -uo pipefail
dir="${1:?usage: tests/kube/wait-ready.sh DIR}"
deadline=$(( $(date +%s) + 90 ))
until curl -fsS --max-time 2 --cacert "$dir/pki/ca.crt" -H "Authorization: Bearer $(cat "$dir/token")" \
  "$(cat "$dir/server")/readyz" >/dev/null 2>&1; do
  kill -0 "$(cat "$dir/etcd.pid")" 2>/dev/null || { echo "etcd exited" >&2; exit 1; }
  kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null || { echo "kube-apiserver exited" >&2; exit 1; }
  [ "$(date +%s)" -lt "$deadline" ] || { echo "kube-apiserver was not ready within 90 s" >&2; exit 1; }
  sleep 0.2
done
