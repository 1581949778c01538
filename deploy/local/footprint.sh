#!/usr/bin/env bash
# Measures iamlet's memory and CPU footprint on this machine (loopback only), to size the
# DaemonSet's resource requests: a node-sized pods file (PODS pods, ROLES roles, one
# 127.0.x.y address each), moto as STS and as the upstream metadata service, then
# ROUNDS rounds of credential requests from every pod address. Prints VmRSS/VmHWM after
# start, after warm-up, after the load and with CONNS connections open, and the CPU seconds
# the load took.
#   usage: deploy/local/footprint.sh [BINARY]   (default target/release/iamlet, else debug)
# Env: PODS (110), ROLES (20), ROUNDS (20), WORKERS (2), CONNS (1000: open at once at the end)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
BIN="${1:-}"
if [ -z "$BIN" ]; then
  if [ -x target/release/iamlet ]; then BIN=target/release/iamlet; else BIN=target/debug/iamlet; fi
fi
PODS="${PODS:-110}" ROLES="${ROLES:-20}" ROUNDS="${ROUNDS:-20}" WORKERS="${WORKERS:-2}"
CONNS="${CONNS:-1000}"
VENV="$ROOT/.venv"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

python3 - "$PODS" "$ROLES" >"$WORK/pods.yaml" <<'PY'
import sys
pods, roles = int(sys.argv[1]), int(sys.argv[2])
print("apiVersion: v1\nkind: List\nitems:")
print("- {apiVersion: v1, kind: Namespace, metadata: {name: load}}")
for i in range(pods):
    ip = f"127.0.{1 + i // 250}.{1 + i % 250}"
    print(f"""- apiVersion: v1
  kind: Pod
  metadata:
    name: app-{i}
    namespace: load
    uid: 00000000-0000-4000-8000-{i:012d}
    creationTimestamp: "2026-01-01T00:00:00Z"
    annotations: {{iam.amazonaws.com/role: role-{i % roles}}}
  spec: {{containers: [{{name: app, image: example/app}}]}}
  status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}""")
PY

MOTO_PORT=$(free_port)
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$WORK/moto.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$MOTO_PORT/moto-api/" >/dev/null 2>&1 && break; sleep 0.1; done

APP_PORT=$(free_port)
env AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
    AWS_EC2_METADATA_DISABLED=true AWS_ENDPOINT_URL_STS="http://127.0.0.1:$MOTO_PORT" \
  "$BIN" --app-port="$APP_PORT" --workers="$WORKERS" \
    --metadata-addr="127.0.0.1:$MOTO_PORT" \
    --base-role-arn=arn:aws:iam::123456789012:role/ \
    --pods-from="$WORK/pods.yaml" >"$WORK/iamlet.log" 2>&1 &
IAMLET=$!
PIDS+=("$IAMLET")
for _ in $(seq 1 200); do curl -fs "http://127.0.0.1:$APP_PORT/ready" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs "http://127.0.0.1:$APP_PORT/ready" >/dev/null || { cat "$WORK/iamlet.log"; exit 1; }

mem() { awk '/^VmRSS|^VmHWM/ {printf "%s %s kB  ", $1, $2} END {print ""}' "/proc/$IAMLET/status"; }
cpu() { awk '{print $14 + $15}' "/proc/$IAMLET/stat"; }   # utime + stime, clock ticks
TCK=$(getconf CLK_TCK)
echo "binary: $BIN  pods: $PODS  roles: $ROLES  workers: $WORKERS"
echo -n "ready:      "; mem
sleep 3   # prefetch of every role's credentials
echo -n "prefetched: "; mem

c0=$(cpu); t0=$(date +%s.%N)
python3 - "$APP_PORT" "$PODS" "$ROLES" "$ROUNDS" <<'PY'
import http.client, sys, socket
port, pods, roles, rounds = map(int, sys.argv[1:])
ok = bad = 0
for r in range(rounds):
    for i in range(pods):
        ip = f"127.0.{1 + i // 250}.{1 + i % 250}"
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(ip, 0))
        for path in ("/latest/meta-data/iam/security-credentials/",
                     f"/latest/meta-data/iam/security-credentials/role-{i % roles}"):
            c.request("GET", path)
            resp = c.getresponse(); resp.read()
            ok += resp.status == 200; bad += resp.status != 200
        c.close()
print(f"requests: {ok} ok, {bad} not ok")
PY
c1=$(cpu); t1=$(date +%s.%N)
echo -n "loaded:     "; mem
python3 -c "import sys; c=($c1-$c0)/$TCK; t=$t1-$t0; print(f'cpu: {c:.2f} s over {t:.1f} s wall = {1000*c/t:.0f} millicores during the load')"
sleep 5
c2=$(cpu)
python3 -c "print(f'idle cpu: {1000*(($c2-$c1)/$TCK)/5:.1f} millicores')"
# CONNS keep-alive connections open at once, each after one credential request.
python3 - "$APP_PORT" "$PODS" "$ROLES" "$CONNS" "$IAMLET" <<'PY'
import http.client, sys
port, pods, roles, conns, pid = map(int, sys.argv[1:])
open_ = []
for n in range(conns):
    i = n % pods
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5,
                                   source_address=(f"127.0.{1 + i // 250}.{1 + i % 250}", 0))
    c.request("GET", f"/latest/meta-data/iam/security-credentials/role-{i % roles}")
    c.getresponse().read()
    open_.append(c)
rss = [l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith(("VmRSS", "VmHWM"))]
print(f"{conns} open connections: VmHWM: {rss[0]} kB  VmRSS: {rss[1]} kB")
for c in open_:
    c.close()
PY
curl -fs "http://127.0.0.1:$APP_PORT/metrics" >"$WORK/metrics.txt" && grep -c '^iamlet_' "$WORK/metrics.txt" | sed 's/^/metric samples: /'
if [ -n "${METRICS_OUT:-}" ]; then cp "$WORK/metrics.txt" "$METRICS_OUT"; fi
