#!/usr/bin/env bash
# Restarts the kube-apiserver that tests/kube/start.sh started in DIR (same etcd, same
# flags, same port) and waits until it is ready again.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
dir="${1:?usage: tests/kube/restart.sh DIR}"
pid="$(cat "$dir/apiserver.pid")"
kill "$pid" 2>/dev/null || true
for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -9 "$pid" 2>/dev/null || true
"$dir/apiserver.sh" >>"$dir/apiserver.log" 2>&1 &
echo $! > "$dir/apiserver.pid"
"$HERE/wait-ready.sh" "$dir" || { tail -n 30 "$dir/apiserver.log" >&2; exit 1; }
