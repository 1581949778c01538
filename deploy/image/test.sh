#!/usr/bin/env bash
# The image's test, with the image run the way the DaemonSet runs it:
#   - a node network namespace with a stand-in instance metadata service at
#     169.254.169.254:80 that answers with the node's role, moto as STS, and two pod
#     namespaces behind veth pairs named like Calico's (cali1, cali2);
#   - the image in the node namespace with host networking, the manifests' securityContext
#     (all capabilities dropped but NET_ADMIN and NET_RAW, read-only root, uid 0, no new
#     privileges), /run/xtables.lock mounted, DaemonSet-like args;
#   - in each pod, an unmodified boto3 with the default metadata endpoint gets its own
#     assumed role, and nothing in a pod ever gets the node's role;
#   - once with the runtime's default seccomp profile (io_uring blocked: epoll) and once with
#     deploy/seccomp/iamlet-io-uring.json (io_uring);
#   - the DaemonSet's surge: containers sharing a host directory at /run/iamlet hand the
#     listening sockets over (--handover-socket) in 3 upgrades in a row, while a pod asks
#     through the DNAT at 500 requests/s, a new connection each, and sees no failure;
#   - then `iamlet cleanup` from the image leaves no rule or chain in either iptables backend.
#   deploy/image/test.sh [--binary PATH] [--no-build] [--image NAME]
#     --binary    what build.sh puts in the image (default target/release/iamlet)
#     --no-build  test the existing image instead of building it first
#     --image     the image (default localhost/iamlet:dev, what build.sh makes)
# Needs root; installs podman, runc, buildah, mmdebstrap, skopeo with apt-get when missing.
# Outside CI (CI is not "true") a missing prerequisite is a SKIPPED line and exit 0; in CI,
# a failure. Everything it creates (namespaces, processes, containers) is removed on exit;
# the image it built stays, as build.sh leaves it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
# shellcheck source=deploy/image/common.sh
. deploy/image/common.sh
# shellcheck source=deploy/wait.sh
. deploy/wait.sh

BINARY=target/release/iamlet
IMAGE=localhost/iamlet:dev
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BINARY=$2; shift 2;;
    --binary=*) BINARY=${1#*=}; shift;;
    --image) IMAGE=$2; shift 2;;
    --image=*) IMAGE=${1#*=}; shift;;
    --no-build) BUILD=0; shift;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2;;
  esac
done

skip_or_fail() {
  if [ "${CI:-}" = true ]; then echo "FAILED: deploy/image/test.sh: $*" >&2; exit 1; fi
  echo "SKIPPED: deploy/image/test.sh: $* (a failure when CI=true)"
  exit 0
}
T_ALL=$(now)
PARTS=()
part_done() { PARTS+=("$(printf '%-58s %6ss' "$1" "$(since "$2")")"); echo "    ok ($(since "$2")s)"; }
summary() {
  echo "==> parts"
  local p
  for p in "${PARTS[@]}"; do echo "    $p"; done
  echo "    total $(since "$T_ALL")s"
}

echo "==> deploy/image/test.sh on $(uname -sr)"
[ "$(id -u)" = 0 ] || skip_or_fail "needs root (network namespaces, iptables, podman's root storage)"
T=$(now)
TOOLS=(podman runc ip nsenter curl python3 iptables-nft-save iptables-legacy-save)
[ "$BUILD" = 1 ] && TOOLS+=(buildah mmdebstrap skopeo strip)
ensure_tools "${TOOLS[@]}" || skip_or_fail "missing tools"
tests/install-python-tools.sh >/dev/null || skip_or_fail "tests/install-python-tools.sh failed (moto, boto3)"
VENV="$ROOT/.venv"
part_done "tools (apt-get, .venv)" "$T"

# io_uring in the second run needs the kernel to offer it with IORING_SETUP_COOP_TASKRUN
# (5.19+; without it --io-driver=auto chooses epoll on purpose) and not to disable it.
URING_DISABLED=$(cat /proc/sys/kernel/io_uring_disabled 2>/dev/null || echo 0)
KVER=$(uname -r | grep -Eo '^[0-9]+\.[0-9]+')
URING_OK=1
if [ "$URING_DISABLED" != 0 ] || [ "$(printf '%s\n5.19\n' "$KVER" | sort -V | head -1)" != 5.19 ]; then
  URING_OK=0
  [ "${CI:-}" = true ] && skip_or_fail "kernel $(uname -r), io_uring_disabled=$URING_DISABLED: no io_uring with COOP_TASKRUN"
  echo "    kernel $(uname -r), io_uring_disabled=$URING_DISABLED: the io_uring part is skipped"
fi

if [ "$BUILD" = 1 ]; then
  [ -x "$BINARY" ] || skip_or_fail "no binary at $BINARY (cargo build --release --locked -p iamlet, or --binary PATH)"
  T=$(now)
  echo "==> build.sh --binary $BINARY --tag $IMAGE"
  deploy/image/build.sh --binary "$BINARY" --tag "$IMAGE" | sed 's/^/    /'
  part_done "image build (mmdebstrap, buildah)" "$T"
fi

WORK=$(mktemp -d /tmp/iamlet-image-test.XXXXXX)
NETNS=() PIDS=() CTRS=()
cleanup() {
  local rc=$? c p n
  set +e
  for c in "${CTRS[@]}"; do podman rm -f -t 0 "$c" >/dev/null 2>&1; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  for n in "${NETNS[@]}"; do ip netns del "$n" 2>/dev/null; done
  rm -rf "$WORK"
  summary
  if [ "$rc" = 0 ]; then echo "==> OK: deploy/image/test.sh"; else echo "==> FAILED: deploy/image/test.sh (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

# Podman's own configuration, not the machine's: runc (crun refuses a cgroup v1 hybrid),
# cgroupfs and file events (no systemd), and ulimits it may set here — its defaults ask for
# more open files than root's hard limit, and conmon runs with at most 32768 processes.
NOFILE=$(ulimit -Hn); NPROC=$(ulimit -Hu)
[ "$NPROC" = unlimited ] || [ "$NPROC" -gt 32768 ] && NPROC=32768
cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$NOFILE:$NOFILE", "nproc=$NPROC:$NPROC"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF="$WORK/containers.conf"
PODMAN=(podman --runtime runc)

echo "==> the image against deploy/image/runtime.conf"
T=$(now)
read_runtime_conf deploy/image/runtime.conf
"${PODMAN[@]}" image inspect "$IMAGE" --format '{{json .Config}}' >"$WORK/config.json" \
  || fail "no image $IMAGE (run deploy/image/build.sh, or drop --no-build)"
python3 - "$WORK/config.json" "$RUNTIME_ENTRYPOINT" "$RUNTIME_USER" "$RUNTIME_WORKDIR" "$RUNTIME_PORT" \
    "${RUNTIME_ENV[@]/#/env:}" "${RUNTIME_LABELS[@]/#/label:}" <<'EOF' || fail "the image does not match runtime.conf"
import json, sys
c = json.load(open(sys.argv[1]))
entrypoint, user, workdir, port, *rest = sys.argv[2:]
want = [("Entrypoint", c.get("Entrypoint"), [entrypoint]), ("Cmd", c.get("Cmd"), None),
        ("User", c.get("User"), user), ("WorkingDir", c.get("WorkingDir"), workdir),
        ("ExposedPorts", sorted(c.get("ExposedPorts") or {}), [f"{port}/tcp"])]
env = dict(e.split("=", 1) for e in c.get("Env") or [])
labels = c.get("Labels") or {}
for r in rest:
    kind, kv = r.split(":", 1)
    k, v = kv.split("=", 1)
    want.append((f"{kind} {k}", (env if kind == "env" else labels).get(k), v))
bad = [f"{n}: {got!r}, want {exp!r}" for n, got, exp in want if got != exp]
print("\n".join(bad) or "    config matches")
sys.exit(1 if bad else 0)
EOF
for l in "${RUNTIME_SYMLINKS[@]}"; do
  out=$("${PODMAN[@]}" run --rm --network=none --entrypoint "$l" "$IMAGE" --version) \
    || fail "$l --version failed in the image"
  echo "    $l --version: $out"
done
# shellcheck disable=SC2016 # expanded by the image's shell
out=$("${PODMAN[@]}" run --rm --network=none --entrypoint /bin/sh "$IMAGE" -c \
  'for t in iptables-nft iptables-legacy ip6tables-nft ip6tables-legacy iptables-nft-restore iptables-legacy-restore conntrack; do command -v $t >/dev/null || echo "missing $t"; done; [ -s /etc/ssl/certs/ca-certificates.crt ] || echo "no CA bundle"') \
  || fail "shell in the image failed"
[ -z "$out" ] || fail "the image lacks: $out"
echo "    iptables (nft, legacy), conntrack, CA bundle present"
if [ "$BUILD" = 1 ]; then
  # The archive build.sh wrote is the same image: its config digest is the image's ID.
  digest=$(skopeo inspect --raw oci-archive:target/image/iamlet-oci.tar \
           | python3 -c 'import json,sys; print(json.load(sys.stdin)["config"]["digest"])') \
    || fail "skopeo cannot read target/image/iamlet-oci.tar"
  [ "$digest" = "sha256:$("${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Id}}')" ] \
    || fail "target/image/iamlet-oci.tar holds $digest, not $IMAGE"
  echo "    target/image/iamlet-oci.tar holds the same image ($digest)"
fi
part_done "image config and contents" "$T"

echo "==> node and pod network namespaces"
T=$(now)
ID=$$
NS_NODE=iamlet-node-$ID
node() { nsenter --net="/run/netns/$NS_NODE" "$@"; }
pod() { local i=$1; shift; nsenter --net="/run/netns/iamlet-pod$i-$ID" "$@"; }
ip netns add "$NS_NODE"; NETNS+=("$NS_NODE")
node ip link set lo up
# The metadata address is the node's own here, as the real service is to a node: a pod whose
# request is not redirected gets the node's answer.
node ip addr add 169.254.169.254/32 dev lo
for i in 1 2; do
  ns=iamlet-pod$i-$ID
  ip netns add "$ns"; NETNS+=("$ns")
  # Created inside the namespaces: no interface ever appears in the host's.
  ip link add "cali$i" netns "$NS_NODE" type veth peer name eth0 netns "$ns"
  node ip addr add "10.77.$i.1/24" dev "cali$i"
  node ip link set "cali$i" up
  pod "$i" ip link set lo up
  pod "$i" ip addr add "10.77.$i.2/24" dev eth0
  pod "$i" ip link set eth0 up
  pod "$i" ip route add default via "10.77.$i.1"
done
HOST_IP=10.77.1.1
ROLES=(- pod-one-role pod-two-role)
NODE_ROLE=node-instance-role-NEVER-IN-A-POD

# Polls until "$@" succeeds, at most SECS seconds, while process PID lives; otherwise says
# what it waited for, shows LOG's tail and stops the test (never goes on after a timed-out
# wait).

cat >"$WORK/imds.py" <<'EOF'
# The node's instance metadata service, reduced to what shows whose answer a client got.
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
ROLE = sys.argv[1]
PATHS = {
    "/latest/meta-data/": "iam/\ninstance-id\nplacement/",
    "/latest/meta-data/instance-id": "i-0123456789abcdef0",
    "/latest/meta-data/placement/region": "us-east-1",
    "/latest/meta-data/iam/info": json.dumps({"Code": "Success",
        "InstanceProfileArn": f"arn:aws:iam::123456789012:instance-profile/{ROLE}"}),
    "/latest/meta-data/iam/security-credentials/": ROLE,
    f"/latest/meta-data/iam/security-credentials/{ROLE}": json.dumps({"Code": "Success",
        "Type": "AWS-HMAC", "AccessKeyId": "ASIANODEROLE0000000", "SecretAccessKey": ROLE,
        "Token": ROLE, "Expiration": "2099-01-01T00:00:00Z", "LastUpdated": "2026-01-01T00:00:00Z"}),
}
class H(BaseHTTPRequestHandler):
    def answer(self, code, body, headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())
    def do_PUT(self):
        if self.path != "/latest/api/token":
            return self.answer(404, "")
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "21600")
        self.answer(200, "node-token", [("X-aws-ec2-metadata-token-ttl-seconds", ttl)])
    def do_GET(self):
        body = PATHS.get(self.path)
        self.answer(200 if body is not None else 404, body or "")
    def log_message(self, fmt, *args):
        print(f"{self.client_address[0]} {fmt % args}", file=sys.stderr, flush=True)
ThreadingHTTPServer(("169.254.169.254", 80), H).serve_forever()
EOF
# Started by nsenter itself, which execs the server: $! is the server's PID.
nsenter --net="/run/netns/$NS_NODE" python3 "$WORK/imds.py" "$NODE_ROLE" >"$WORK/imds.log" 2>&1 &
PIDS+=($!)
wait_until 10 "the node's metadata service" "$WORK/imds.log" "$!" \
  node curl -fsS --max-time 1 http://169.254.169.254/latest/meta-data/

MOTO_PORT=5000
# On every address of the node: the agent calls it on loopback, the pods' boto3 on their
# gateway.
nsenter --net="/run/netns/$NS_NODE" "$VENV/bin/moto_server" -H 0.0.0.0 -p "$MOTO_PORT" >"$WORK/moto.log" 2>&1 &
PIDS+=($!)
wait_until 90 "moto on :$MOTO_PORT" "$WORK/moto.log" "$!" \
  node curl -fsS --max-time 2 "http://127.0.0.1:$MOTO_PORT/moto-api/"

cat >"$WORK/pods.yaml" <<EOF
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: shop}}
$(for i in 1 2; do cat <<POD
- apiVersion: v1
  kind: Pod
  metadata:
    name: pod$i
    namespace: shop
    uid: 2f0c6a3e-000$i-4b8e-9d1e-00000000000$i
    creationTimestamp: "2026-01-01T00:00:00Z"
    annotations: {iam.amazonaws.com/role: ${ROLES[$i]}}
  spec: {nodeName: node, containers: [{name: app, image: example/app}]}
  status: {phase: Running, podIP: 10.77.$i.2, podIPs: [{ip: 10.77.$i.2}]}
POD
done)
EOF

# Before any agent: a pod reaches the node's metadata service and gets the node's role, so
# the checks below that it never does mean something.
out=$(pod 1 curl -fsS --max-time 3 http://169.254.169.254/latest/meta-data/iam/security-credentials/) \
  || fail "pod 1 cannot reach the metadata address at all"
[ "$out" = "$NODE_ROLE" ] || fail "pod 1 without an agent got '$out', not the node's role"
echo "    without an agent, pod 1 gets the node's role (the leak the agent closes)"
part_done "namespaces, metadata stand-in, moto" "$T"

touch /run/xtables.lock
# shellcheck disable=SC2054 # the commas are --mount's
SECURITY=(--cap-drop=ALL --cap-add=NET_ADMIN --cap-add=NET_RAW --read-only --read-only-tmpfs=false
          --user 0 --security-opt=no-new-privileges
          --mount type=bind,src=/run/xtables.lock,dst=/run/xtables.lock)
saved() {
  local b
  for b in nft legacy; do node "iptables-$b-save"; node "ip6tables-$b-save"; done 2>/dev/null
}
ours() { grep -E 'IAMLET|iamlet|169\.254\.169\.254' || true; }

# Starts the agent's container, named $1, with iptables backend $2, the extra podman options
# that follow up to a `--`, and after it extra iamlet arguments; sets AGENT (its id).
run_agent() {
  local name=$1 backend=$2 opts=()
  shift 2
  while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  # By name before it exists: a container that was created but failed to start goes too.
  CTRS+=("$name")
  AGENT=$("${PODMAN[@]}" run -d --name "$name" --network "ns:/run/netns/$NS_NODE" \
    "${SECURITY[@]}" "${opts[@]}" \
    -v "$WORK/pods.yaml:/pods/pods.yaml:ro" \
    -e AWS_REGION=us-east-1 -e AWS_ACCESS_KEY_ID=testing -e AWS_SECRET_ACCESS_KEY=testing \
    -e AWS_EC2_METADATA_DISABLED=true -e "AWS_ENDPOINT_URL_STS=http://127.0.0.1:$MOTO_PORT" \
    "$IMAGE" \
    --iptables=true --host-ip="$HOST_IP" --host-interface=cali+ --app-port=8181 \
    --pods-from=/pods/pods.yaml --base-role-arn=arn:aws:iam::123456789012:role/ \
    --metadata-addr=169.254.169.254 --iptables-backend="$backend" --io-driver=auto --log-level=info \
    "$@")
}

# Runs the agent with iptables backend $1 and the extra podman options "$@" (after $1), and
# waits for its /ready; sets AGENT (its container id).
start_agent() {
  local backend=$1
  shift
  run_agent "iamlet-agent-$ID-$RUN" "$backend" "$@"
  local i
  for i in $(seq 1 300); do
    node curl -fsS --max-time 1 "http://$HOST_IP:8181/ready" >/dev/null 2>&1 && return 0
    [ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$AGENT")" = true ] || break
    sleep 0.1
  done
  agent_fail "agent ($RUN) exited, or was not ready within 30s"
}
agent_fail() {
  echo "--- the agent's log ($RUN)" >&2
  "${PODMAN[@]}" logs "$AGENT" 2>&1 | tail -n 40 >&2
  fail "$*"
}

# Each pod, as a workload would: an unmodified boto3, no credentials of its own, the
# default metadata endpoint (IMDSv2 first), STS at moto.
pods_get_their_roles() {
  local i out arn
  for i in 1 2; do
    out=$(pod "$i" curl -sS --max-time 3 http://169.254.169.254/latest/meta-data/iam/security-credentials/ 2>&1) || true
    [ "$out" = "${ROLES[$i]}" ] || agent_fail "pod $i: role listing '$out', want ${ROLES[$i]}"
    arn=$(pod "$i" env -i PATH=/usr/bin:/bin HOME="$WORK" AWS_CONFIG_FILE=/dev/null \
          AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1 \
          AWS_ENDPOINT_URL_STS="http://10.77.$i.1:$MOTO_PORT" \
          "$VENV/bin/python" -c 'import boto3; print(boto3.client("sts").get_caller_identity()["Arn"])' 2>&1) \
      || agent_fail "pod $i: boto3 failed: $arn"
    case "$arn" in
      *":assumed-role/${ROLES[$i]}/"*) echo "    pod $i (10.77.$i.2): $arn";;
      *) agent_fail "pod $i: got '$arn', want assumed-role/${ROLES[$i]}/...";;
    esac
  done
}

# $1: the driver the agent must run on; $2: what its log must say.
check_driver() {
  local driver=$1 want_log=$2 logs metrics
  logs=$("${PODMAN[@]}" logs "$AGENT" 2>&1)
  grep -F -- "$want_log" <<<"$logs" >/dev/null || agent_fail "no log line containing '$want_log'"
  grep -E " listening .*driver=$driver\b" <<<"$logs" >/dev/null || agent_fail "the listening line does not say driver=$driver"
  metrics=$(node curl -fsS --max-time 2 "http://$HOST_IP:8181/metrics") || agent_fail "no /metrics"
  grep -Fx "iamlet_io_driver_info{driver=\"$driver\"} 1" <<<"$metrics" >/dev/null \
    || agent_fail "/metrics lacks iamlet_io_driver_info{driver=\"$driver\"} 1: $(grep io_driver <<<"$metrics")"
  echo "    driver $driver: log says '$want_log', /metrics says so"
  grep -E 'iptables|backend' <<<"$logs" | sed -E 's/^[^ ]+ +//; s/^/    agent: /' || true
}

stop_agent() {
  "${PODMAN[@]}" stop -t 10 "$AGENT" >/dev/null
  local code
  code=$("${PODMAN[@]}" inspect -f '{{.State.ExitCode}}' "$AGENT")
  [ "$code" = 0 ] || agent_fail "the agent exited with $code on SIGTERM"
  # Fail-closed: the rule outlives the agent, and a pod now gets no answer at all, never the
  # node's.
  saved | grep -q -- "--to-destination $HOST_IP:8181" || fail "the DNAT rule went away with the agent"
  local out
  out=$(pod 1 curl -sS --max-time 3 http://169.254.169.254/latest/meta-data/iam/security-credentials/ 2>&1) || true
  ! grep -q "$NODE_ROLE" <<<"$out" || fail "with the agent stopped, pod 1 got the node's role"
  echo "    stopped (exit 0); rule kept, pod 1 gets no answer: ${out:0:60}"
  "${PODMAN[@]}" rm "$AGENT" >/dev/null
}

IMDS_LINES=$(wc -l <"$WORK/imds.log")
RUN=epoll
echo "==> agent, the runtime's default seccomp profile (io_uring blocked)"
T=$(now)
start_agent auto
node iptables-nft-save -t nat | grep -q -- "--to-destination $HOST_IP:8181" \
  || agent_fail "no DNAT rule to $HOST_IP:8181 (nft, what auto picks on an empty node): $(saved | ours)"
pods_get_their_roles
check_driver epoll "io_uring unavailable"
stop_agent
part_done "agent, default seccomp: epoll, pods' roles, fail-closed" "$T"

RUN=uring
if [ "$URING_OK" = 1 ]; then
  # And iptables-legacy, the backend of older node images (it needs NET_RAW): cleanup then
  # has rules in both backends to remove.
  echo "==> agent, deploy/seccomp/iamlet-io-uring.json (the default plus io_uring), iptables-legacy"
  T=$(now)
  start_agent legacy --security-opt "seccomp=$ROOT/deploy/seccomp/iamlet-io-uring.json"
  node iptables-legacy-save -t nat | grep -q -- "--to-destination $HOST_IP:8181" \
    || agent_fail "no DNAT rule to $HOST_IP:8181 in iptables-legacy: $(saved | ours)"
  pods_get_their_roles
  check_driver uring "driver=uring"
  stop_agent
  part_done "agent, io_uring profile, legacy: uring, pods' roles" "$T"
fi

# The DaemonSet's surge (maxSurge 1), for real: the new pod's iamlet starts beside the old
# one on the node, takes its listening sockets over the shared hostPath and the old one
# drains and exits, three times over, while a pod asks through the DNAT without pause.
cat >"$WORK/load.py" <<'EOF'
# A pod's client at a steady rate, one new connection per request (a connection's first
# packet is where a closed or unserved listener would show), counting what each one got.
import json, signal, socket, sys, time
role, node_role, rate, max_s = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
ADDR = ("169.254.169.254", 80)
REQ = (b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\n"
       b"Host: 169.254.169.254\r\nConnection: close\r\n\r\n")
LIMIT = 1.0
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)

def ask():
    t0 = time.monotonic()
    deadline = t0 + LIMIT
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    buf = b""
    try:
        s.settimeout(LIMIT)
        s.connect(ADDR)
        s.sendall(REQ)
        while True:
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                length = [l.split(b":", 1)[1] for l in head.split(b"\r\n")
                          if l.lower().startswith(b"content-length:")]
                if length and len(body) >= int(length[0]):
                    break
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            s.settimeout(left)
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except ConnectionRefusedError:
        return "refused", "", time.monotonic() - t0
    except (ConnectionResetError, BrokenPipeError):
        return "reset", buf[:80].decode(errors="replace"), time.monotonic() - t0
    except socket.timeout:
        return "timeout", buf[:80].decode(errors="replace"), time.monotonic() - t0
    except OSError as e:
        return "other", str(e), time.monotonic() - t0
    finally:
        s.close()
    took = time.monotonic() - t0
    text = buf.decode(errors="replace")
    if node_role in text:
        return "leak", text[-80:], took
    if not buf:
        return "closed", "", took
    status = text.split("\r\n", 1)[0]
    if status.split(" ")[1:2] != ["200"] or text.partition("\r\n\r\n")[2] != role:
        return "wrong", text[:80], took
    return ("timeout" if took > LIMIT else "ok"), "", took

counts = dict.fromkeys(["ok", "refused", "reset", "timeout", "closed", "wrong", "leak", "other"], 0)
fails, took = [], []
start = next_at = time.monotonic()
while not stop and time.monotonic() - start < max_s:
    now = time.monotonic()
    if now < next_at:
        time.sleep(next_at - now)
    # On schedule, but a stall is not made up for with a burst.
    next_at = max(next_at + 1 / rate, time.monotonic() - 0.05)
    kind, detail, t = ask()
    counts[kind] += 1
    took.append(t)
    if kind != "ok" and len(fails) < 20:
        fails.append(f"{time.monotonic() - start:.3f}s {kind} {detail!r}")
    if kind == "ok" and counts["ok"] == 1:
        print("first ok", flush=True)
elapsed = time.monotonic() - start
took.sort()
q = lambda p: round(1000 * took[min(len(took) - 1, int(p * len(took)))], 2) if took else None
print(json.dumps({"requests": len(took), "seconds": round(elapsed, 2), "counts": counts,
                  "ms_p50": q(0.5), "ms_p99": q(0.99), "ms_max": q(1.0), "fails": fails}), flush=True)
EOF

# The node's hostPath, fresh (as DirectoryOrCreate makes it) and only root's.
HANDOVER_DIR=$(mktemp -d "$WORK/run-iamlet.XXXXXX")
# Every surge container, kept after it exits until the part is done, for its log.
SURGE=()
# Shows every surge container's log and the load's, then stops the test.
surge_fail() {
  local c
  for c in "${SURGE[@]}"; do
    echo "--- $c" >&2
    { "${PODMAN[@]}" logs "$c" 2>&1 || true; } | tail -n 25 >&2
  done
  echo "--- the pod's load" >&2
  tail -n 25 "$WORK/load.log" >&2 || true
  fail "$*"
}
# Runs surge container number $1 on the shared directory; sets AGENT. The DaemonSet's auto
# backend: it stays with the rules the parts before left, which the cleanup part expects.
surge_agent() {
  run_agent "iamlet-surge-$ID-$1" auto -v "$HANDOVER_DIR:/run/iamlet" \
    -- --handover-socket=/run/iamlet/handover.sock
  SURGE+=("iamlet-surge-$ID-$1")
}
# Whether container $1's log has a line containing $2. Not `podman logs | grep -q`: grep
# stops at the first match and, with pipefail, podman's SIGPIPE fails the pipeline.
logs_have() {
  local logs
  logs=$("${PODMAN[@]}" logs "$1" 2>&1) || return 1
  grep -qF -- "$2" <<<"$logs"
}
# Waits at most $2 seconds for container $1's log to have a line containing $3.
wait_log() {
  local c=$1 secs=$2 want=$3 deadline
  # By the clock: one `podman logs` alone may take a good part of a poll's interval.
  deadline=$(( ${EPOCHREALTIME/./} + secs * 1000000 ))
  while [ "${EPOCHREALTIME/./}" -lt "$deadline" ]; do
    logs_have "$c" "$want" && return 0
    [ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$c")" = true ] \
      || surge_fail "$c exited before logging '$want'"
    sleep 0.05
  done
  surge_fail "$c did not log '$want' within ${secs}s"
}
rules_now() { saved | ours | sed -E 's/ \[[0-9]+:[0-9]+\]$//'; }

RUN=surge
UPGRADES=3
LOAD_RATE=500
echo "==> DaemonSet surge: $UPGRADES upgrades handing the listening sockets over, a pod asking all along"
T=$(now)
surge_agent 0
OLD=$AGENT
wait_log "$OLD" 30 "ready: the first pod list is published"
out=''
for i in $(seq 1 30); do
  out=$(pod 1 curl -sS --max-time 1 http://169.254.169.254/latest/meta-data/iam/security-credentials/ 2>&1) || true
  [ "$out" = "${ROLES[1]}" ] && break
  sleep 0.1
done
[ "$out" = "${ROLES[1]}" ] || surge_fail "pod 1 got '$out' through the DNAT, want ${ROLES[1]}"
! logs_have "$OLD" "handover: took" || surge_fail "the first agent took sockets from nobody"
perms=$(stat -c '%a %u' "$HANDOVER_DIR" "$HANDOVER_DIR/handover.sock" | tr '\n' ' ')
[ "$perms" = "700 0 600 0 " ] || surge_fail "the handover directory and socket are '$perms', want 700 0, 600 0"
RULES_BEFORE=$(rules_now)
grep -q -- "--to-destination $HOST_IP:8181" <<<"$RULES_BEFORE" || surge_fail "no DNAT rule to $HOST_IP:8181: $RULES_BEFORE"

# Bounded twice: its own deadline, and a TERM once the upgrades are done.
nsenter --net="/run/netns/iamlet-pod1-$ID" python3 "$WORK/load.py" "${ROLES[1]}" "$NODE_ROLE" \
  "$LOAD_RATE" 60 >"$WORK/load.log" 2>&1 &
LOAD=$!
PIDS+=("$LOAD")
for i in $(seq 1 50); do
  grep -qs '^first ok' "$WORK/load.log" && break
  kill -0 "$LOAD" 2>/dev/null || surge_fail "the load stopped"
  sleep 0.1
done
grep -q '^first ok' "$WORK/load.log" || surge_fail "the load got no answer within 5s"

TIMES=()
for n in $(seq 1 "$UPGRADES"); do
  t=$(now)
  surge_agent "$n"
  NEW=$AGENT
  wait_log "$NEW" 30 "ready: the first pod list is published"
  t_ready=$(since "$t")
  # The old one drains (at most --shutdown-grace, 5s) and exits on its own.
  code=$(timeout 15 "${PODMAN[@]}" wait "$OLD") || surge_fail "the old agent did not exit within 15s of the new one's ready"
  [ "$code" = 0 ] || surge_fail "the old agent exited with $code after the handover"
  logs_have "$OLD" "handover: the new process accepts on our sockets; stopping" \
    || surge_fail "the old agent's log does not say it handed its sockets over"
  for want in "handover: took the running iamlet's listening sockets" "handover: the previous iamlet stopped accepting"; do
    logs_have "$NEW" "$want" || surge_fail "the new agent's log lacks '$want'"
  done
  TIMES+=("upgrade $n: new one ready ${t_ready}s, old one exited 0 at $(since "$t")s")
  OLD=$NEW
done
# The last one alone serves a while: what it accepts now, it accepts by itself.
sleep 0.3
kill -TERM "$LOAD"
for i in $(seq 1 30); do kill -0 "$LOAD" 2>/dev/null || break; sleep 0.1; done
kill -0 "$LOAD" 2>/dev/null && surge_fail "the load did not stop within 3s of TERM"
wait "$LOAD" || surge_fail "the load failed"
result=$(tail -n 1 "$WORK/load.log")
for t in "${TIMES[@]}"; do echo "    $t"; done
python3 - "$result" <<'EOF' || surge_fail "the pod saw failures during the upgrades"
import json, sys
r = json.loads(sys.argv[1])
c = r["counts"]
bad = sum(v for k, v in c.items() if k != "ok")
print(f"    pod 1: {r['requests']} requests in {r['seconds']}s ({r['requests'] / r['seconds']:.0f}/s), "
      f"{c['ok']} ok, {bad} failed (" + ", ".join(f"{k} {v}" for k, v in c.items() if k != "ok") + ")")
print(f"    latency p50 {r['ms_p50']} ms, p99 {r['ms_p99']} ms, max {r['ms_max']} ms")
for f in r["fails"]:
    print(f"    failure: {f}")
sys.exit(1 if bad or c["leak"] or not c["ok"] else 0)
EOF
[ "$(rules_now)" = "$RULES_BEFORE" ] || surge_fail "the DNAT rules changed across the upgrades: $(rules_now)"
echo "    the DNAT rules are as before the first upgrade"
stop_agent
for c in "${SURGE[@]}"; do "${PODMAN[@]}" rm --ignore "$c" >/dev/null; done
part_done "DaemonSet surge: $UPGRADES handovers, no failed request" "$T"
# The node's own credentials were never asked for while an agent ran.
! tail -n +"$((IMDS_LINES + 1))" "$WORK/imds.log" | grep -q 'security-credentials' \
  || fail "the node's metadata service was asked for its credentials: $(tail -n +"$((IMDS_LINES + 1))" "$WORK/imds.log" | grep security-credentials)"

echo "==> iamlet cleanup from the image"
T=$(now)
[ -n "$(saved | ours)" ] || fail "nothing to clean up: the agents left no rule"
for b in nft legacy; do
  echo "    before, iptables-$b-save: $(node "iptables-$b-save" -t nat 2>/dev/null | ours | wc -l) line(s) of iamlet's"
done
out=$("${PODMAN[@]}" run --rm --name "iamlet-cleanup-$ID" --network "ns:/run/netns/$NS_NODE" \
      "${SECURITY[@]}" "$IMAGE" cleanup 2>&1) || { echo "$out" >&2; fail "iamlet cleanup failed"; }
printf '%s\n' "$out" | sed 's/^/    /'
left=$(saved | ours)
[ -z "$left" ] || fail "left after cleanup (iptables-nft-save, iptables-legacy-save): $left"
echo "    iptables-{nft,legacy}-save, ip6tables-{nft,legacy}-save: nothing of iamlet's left"
out=$(pod 1 curl -fsS --max-time 3 http://169.254.169.254/latest/meta-data/iam/security-credentials/) || true
[ "$out" = "$NODE_ROLE" ] || fail "after cleanup pod 1 got '$out': the redirect is still there"
echo "    pods reach the metadata address directly again (no redirect left)"
part_done "cleanup from the image, both backends empty" "$T"
