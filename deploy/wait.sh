# shellcheck shell=bash
# Sourced by deploy/local/demo.sh and deploy/image/test.sh.

# wait_until SECONDS WHAT LOG PID CMD...: runs CMD every 100 ms until it succeeds, at most
# SECONDS. When the process PID exits first, or time runs out, says so with LOG's tail and
# exits 1: nothing goes on without the server it waits for.
wait_until() {
  local secs=$1 what=$2 log=$3 pid=$4 _
  shift 4
  for _ in $(seq 1 $((secs * 10))); do
    "$@" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || { echo "FAIL: $what: exited; $log:" >&2; tail -n 40 "$log" >&2; exit 1; }
    sleep 0.1
  done
  echo "FAIL: $what: not within ${secs}s; $log:" >&2
  tail -n 40 "$log" >&2
  exit 1
}
