#!/usr/bin/env bash
# Stops what tests/kube/start.sh started in DIR (by the PIDs it wrote there) and removes DIR.
set -uo pipefail
dir="${1:?usage: tests/kube/stop.sh DIR (the dir= line start.sh printed)}"
[ -d "$dir" ] || exit 0
for p in apiserver etcd; do
  [ -f "$dir/$p.pid" ] && kill "$(cat "$dir/$p.pid")" 2>/dev/null
done
for p in apiserver etcd; do
  [ -f "$dir/$p.pid" ] || continue
  pid="$(cat "$dir/$p.pid")"
  # Gone, or a zombie its parent (start.sh, long exited) will never reap.
  for _ in $(seq 50); do
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)"
    [ -z "$state" ] || [ "$state" = Z ] && break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null
done
watchdog="$(cat "$dir/watchdog.pid" 2>/dev/null)"
rm -rf "$dir"
# The watchdog runs this script itself when its owner is gone (as its parent, or exec-ed in
# its place): it is only stopped when someone else called this.
if [ -n "$watchdog" ] && [ "$watchdog" != "$PPID" ] && [ "$watchdog" != "$$" ]; then
  kill "$watchdog" 2>/dev/null
fi
