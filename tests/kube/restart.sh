#!/usr/bin/env bash
# Restarts the kube-apiserver that tests/kube/start.sh started in DIR (same etcd, same
# flags, same port) and waits until it is ready again.
#   restart.sh DIR --down   only stops it (etcd keeps running: a test may compact it now)
#   restart.sh DIR --up     only starts it again and waits until it is ready
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
dir="${1:?usage: tests/kube/restart.sh DIR [--down|--up]}"
phase="${2:-both}"
case "$phase" in both|--down|--up) ;; *) echo "tests/kube/restart.sh: unknown phase $phase" >&2; exit 2 ;; esac
if [ "$phase" != --up ]; then
  pid="$(cat "$dir/apiserver.pid")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    # Gone, or a zombie nobody reaps (its parent, start.sh or this script, has exited).
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" || true
    { [ -z "$state" ] || [ "$state" = Z ]; } && break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
fi
if [ "$phase" != --down ]; then
  "$dir/apiserver.sh" >>"$dir/apiserver.log" 2>&1 &
  echo $! > "$dir/apiserver.pid"
  "$HERE/wait-ready.sh" "$dir" || { tail -n 30 "$dir/apiserver.log" >&2; exit 1; }
fi
